//! The README's configuration reference is the key table itself, not a copy that drifts.

#[test]
fn readme_config_table_matches_the_key_table() {
    let readme = include_str!("../README.md");
    let begin = readme
        .find("<!-- BEGIN CONFIG TABLE")
        .expect("begin marker");
    let body = &readme[begin..];
    let start = body.find('\n').expect("line after marker") + 1;
    let end = body.find("<!-- END CONFIG TABLE -->").expect("end marker");
    assert_eq!(
        &body[start..end],
        kvtier::config::reference_table_markdown(),
        "README.md's configuration table is stale: regenerate it from reference_table_markdown()"
    );
}
