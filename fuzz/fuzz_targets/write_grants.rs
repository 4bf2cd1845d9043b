//! Any sequence of grants, revokes, admitted writes (kept or ended) against a P/D
//! buffer's write-grant table, checked step by step against a model: a write is admitted
//! exactly when every unit it touches is granted to its connection (never past the table,
//! never without a writer id, never after a revoke), and a unit counts as being written
//! exactly while an admitted write touching it has not ended.
#![no_main]

use kvtier_transport::{WriteGrants, WriteGuard, WriterId};
use libfuzzer_sys::fuzz_target;

const UNITS: usize = 8;
const UNIT: u64 = 64;

fuzz_target!(|data: &[u8]| {
    let grants = WriteGrants::new(UNIT, UNITS);
    // The model: each unit's writer (0 = none), and the unit ranges of admitted writes.
    let mut writer = [0u64; UNITS];
    let mut admitted: Vec<(WriteGuard, std::ops::Range<usize>)> = Vec::new();
    let mut bytes = data.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let who = u64::from(arg % 3); // 0: no writer id; 1, 2: two connections
        match op % 4 {
            0 => {
                let unit = (arg as usize / 3) % (UNITS + 2); // past the table too
                if who > 0 {
                    grants.grant(WriterId(who), [unit as u32]);
                    if unit < UNITS {
                        writer[unit] = who;
                    }
                }
            }
            1 => {
                let unit = (arg as usize / 3) % (UNITS + 2);
                grants.revoke([unit as u32]);
                if unit < UNITS {
                    writer[unit] = 0;
                }
            }
            2 => {
                let offset = u64::from(bytes.next().unwrap_or(0)) * 5;
                let len = u64::from(bytes.next().unwrap_or(0)) * 3;
                let id = (who > 0).then_some(WriterId(who));
                let got = grants.admit(id, offset, len);
                let range = if len == 0 {
                    0..0
                } else {
                    (offset / UNIT) as usize..((offset + len - 1) / UNIT) as usize + 1
                };
                let expect = who > 0
                    && (len == 0
                        || (range.end <= UNITS && writer[range.clone()].iter().all(|&w| w == who)));
                assert_eq!(got.is_ok(), expect, "write {offset}+{len} by {who}");
                if let Ok(guard) = got {
                    admitted.push((guard, range));
                }
            }
            _ => {
                if !admitted.is_empty() {
                    let i = arg as usize % admitted.len();
                    admitted.swap_remove(i);
                }
            }
        }
        for unit in 0..UNITS {
            let landing = admitted.iter().any(|(_, r)| r.contains(&unit));
            assert_eq!(grants.landing(&[unit as u32]), landing, "unit {unit}");
        }
    }
});
