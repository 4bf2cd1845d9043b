//! The Redis/Valkey remote tier (`remote_url: redis://host:port[/db]`): objects are
//! string values under `kvtier:<key>`, written and read in pipelined batches.

use redis::aio::MultiplexedConnection;

use super::rpc::ObjectKey;
use super::RemoteError;
use crate::memory::{BufferPool, KvBuffer};

/// A Redis or Valkey server used as the remote tier. Calls run concurrently over one
/// multiplexed connection (each holds a clone of it); no lock is held while Redis answers.
pub struct RedisStore {
    client: redis::Client,
    url: String,
    conn: parking_lot::Mutex<Option<MultiplexedConnection>>,
    timeout: std::time::Duration,
}

/// Bytes of values per pipelined write (Redis caps a client's query buffer at 1 GiB).
const PIPELINE_BYTES: usize = 256 << 20;

fn name(key: ObjectKey) -> String {
    format!("kvtier:{key:032x}")
}

impl RedisStore {
    /// A store at `url`; connects on first use (and again after errors).
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Self, RemoteError> {
        let client = redis::Client::open(url).map_err(|source| RemoteError::Redis {
            url: url.to_string(),
            source,
        })?;
        Ok(RedisStore {
            client,
            // For messages: never with a password.
            url: crate::config::redact_passwords(url),
            conn: parking_lot::Mutex::new(None),
            timeout,
        })
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, RemoteError> {
        let shared = self.conn.lock().clone();
        let result = tokio::time::timeout(self.timeout, async {
            let mut conn = match shared {
                Some(conn) => conn,
                None => {
                    // Our own timeout bounds each call; the crate's default (500 ms) is too
                    // short for pipelines of large values.
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout));
                    let conn = self
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    *self.conn.lock() = Some(conn.clone());
                    conn
                }
            };
            pipe.query_async::<T>(&mut conn).await
        })
        .await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *self.conn.lock() = None;
                Err(RemoteError::Redis {
                    url: self.url.clone(),
                    source: e,
                })
            }
            Err(_) => {
                *self.conn.lock() = None;
                Err(RemoteError::Timeout {
                    what: format!("Redis at {}", self.url),
                    after: self.timeout,
                })
            }
        }
    }

    /// Stores objects (each given as the parts to concatenate).
    pub async fn put(&self, objects: &[(ObjectKey, Vec<&[u8]>)]) -> Result<(), RemoteError> {
        // Pipelines of at most PIPELINE_BYTES: Redis buffers a whole query before running it.
        let mut start = 0;
        while start < objects.len() {
            let mut pipe = redis::pipe();
            let mut bytes = 0;
            let mut end = start;
            while end < objects.len() && (end == start || bytes < PIPELINE_BYTES) {
                let (key, parts) = &objects[end];
                let value: Vec<u8> = parts.concat();
                bytes += value.len();
                pipe.set(name(*key), value).ignore();
                end += 1;
            }
            self.run::<()>(&pipe).await?;
            start = end;
        }
        Ok(())
    }

    /// Reads objects, each split after `header` bytes; `None` for misses.
    pub async fn get(
        &self,
        keys: &[ObjectKey],
        header: usize,
        pool: &BufferPool,
    ) -> Result<Vec<Option<(Vec<u8>, KvBuffer)>>, RemoteError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.get(name(*key));
        }
        let values: Vec<Option<Vec<u8>>> = self.run(&pipe).await?;
        Ok(values
            .into_iter()
            .map(|v| {
                let v = v?;
                if v.len() < header {
                    return None;
                }
                let mut body = pool.alloc(v.len() - header);
                crate::memory::copy_bulk(&mut body, &v[header..]);
                Some((v[..header].to_vec(), body))
            })
            .collect())
    }

    /// Which objects are stored.
    pub async fn exists(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.exists(name(*key));
        }
        self.run(&pipe).await
    }

    /// Removes objects; returns which were held.
    pub async fn remove(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, RemoteError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.del(name(*key));
        }
        let n: Vec<u64> = self.run(&pipe).await?;
        Ok(n.into_iter().map(|n| n > 0).collect())
    }
}
