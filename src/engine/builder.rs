//! [`EngineBuilder`]: an engine from settings rather than a YAML file.

use std::path::PathBuf;

use crate::config::{
    Config, ConfigError, DiskSettings, EngineSettings, PdSettings, RemoteSettings,
};
use crate::error::Result;
use crate::model::ModelSpec;

use super::Engine;

/// Builds an [`Engine`] for embedders that do not start from YAML. Every setting starts at
/// the default of an empty configuration file (each setter names it); [`build`] checks
/// them as loading a file would.
///
/// ```no_run
/// # async fn run() -> kvtier::Result<()> {
/// use kvtier::{Engine, ModelSpec};
///
/// let engine = Engine::builder(ModelSpec::llama_3_1_8b())
///     .chunk_size(256)
///     .cpu_tier(Some(8 << 30))
///     .disk_tier("/var/cache/kvtier", 200 << 30)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
///
/// [`build`]: EngineBuilder::build
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    model: ModelSpec,
    settings: EngineSettings,
    disk_write_queue: usize,
}

impl EngineBuilder {
    /// Every setting at its default.
    pub(super) fn new(model: ModelSpec) -> Self {
        Self::from_settings(model, Config::default().engine_settings())
    }

    /// Starts from resolved settings (what [`Engine::from_config`] does).
    pub(super) fn from_settings(model: ModelSpec, settings: EngineSettings) -> Self {
        let disk_write_queue = match &settings.tiers.disk {
            Some(d) => d.write_queue,
            None => Config::default().local_disk_write_queue,
        };
        EngineBuilder {
            model,
            settings,
            disk_write_queue,
        }
    }

    /// Tokens per chunk (`chunk_size`). Default 256.
    pub fn chunk_size(mut self, tokens: usize) -> Self {
        self.settings.keys.chunk_size = tokens;
        self
    }

    /// Seed mixed into every chunk hash (`hash_seed`). Default 0.
    pub fn hash_seed(mut self, seed: u64) -> Self {
        self.settings.keys.hash_seed = seed;
        self
    }

    /// Whether the trailing partial chunk of a sequence is stored too
    /// (`save_unfull_chunk`). Default true.
    pub fn save_unfull_chunk(mut self, save: bool) -> Self {
        self.settings.keys.save_unfull_chunk = save;
        self
    }

    /// Capacity of the host-memory tier in bytes, `None` for no CPU tier (`local_cpu`,
    /// `max_local_cpu_size`). Default 5 GiB.
    pub fn cpu_tier(mut self, capacity_bytes: Option<u64>) -> Self {
        self.settings.tiers.cpu_bytes = capacity_bytes;
        self
    }

    /// A disk tier in `dir` holding at most `capacity_bytes` (`local_disk`,
    /// `max_local_disk_size`). Default: none.
    pub fn disk_tier(mut self, dir: impl Into<PathBuf>, capacity_bytes: u64) -> Self {
        self.settings.tiers.disk = Some(DiskSettings {
            dir: dir.into(),
            capacity_bytes,
            write_queue: self.disk_write_queue,
        });
        self
    }

    /// Bound, in chunks, of the disk tier's background write queue
    /// (`local_disk_write_queue`). Default 64.
    pub fn disk_write_queue(mut self, chunks: usize) -> Self {
        self.disk_write_queue = chunks;
        if let Some(d) = &mut self.settings.tiers.disk {
            d.write_queue = chunks;
        }
        self
    }

    /// Capacity of the GPU tier in bytes, 0 for none (`max_local_gpu_size`; needs the
    /// `cuda` feature). Default 0.
    pub fn gpu_tier(mut self, capacity_bytes: u64) -> Self {
        self.settings.tiers.gpu_bytes = capacity_bytes;
        self
    }

    /// This instance's P/D role (`enable_pd`, `pd_role` and the `pd_*` keys; see
    /// [`Config::pd_sender_settings`] and [`Config::pd_receiver_settings`] for the
    /// defaults of their fields). Default: none.
    pub fn pd(mut self, pd: PdSettings) -> Self {
        self.settings.pd = Some(pd);
        self
    }

    /// The remote tier (`remote_url` and `extra_config`; see [`Config::remote_settings`]).
    /// Default: none.
    pub fn remote(mut self, remote: RemoteSettings) -> Self {
        self.settings.remote = Some(remote);
        self
    }

    /// The settings as they stand.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    fn check(&self) -> Result<(), ConfigError> {
        let fail = |keys: &[&str], message: &str| {
            Err(ConfigError::Invalid {
                origin: "Engine::builder".into(),
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                message: message.into(),
            })
        };
        if self.settings.keys.chunk_size == 0 {
            return fail(&["chunk_size"], "chunk_size must be at least 1");
        }
        if let Some(d) = &self.settings.tiers.disk {
            if d.capacity_bytes == 0 {
                return fail(
                    &["local_disk", "max_local_disk_size"],
                    "max_local_disk_size must be > 0 for a disk tier",
                );
            }
            if d.write_queue == 0 {
                return fail(
                    &["local_disk_write_queue"],
                    "local_disk_write_queue must be at least 1",
                );
            }
        }
        Ok(())
    }

    /// Checks the settings and opens the engine: indexes the chunk files already in the
    /// disk tier, starts the P/D role's listeners, opens the remote tier (which contacts
    /// no server until its first operation).
    pub async fn build(self) -> Result<Engine> {
        self.check()?;
        Engine::open(self.model, self.settings).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults each setter documents are those of an empty configuration file.
    #[test]
    fn documented_defaults_hold() {
        let b = Engine::builder(ModelSpec::llama_3_1_8b());
        let s = b.settings();
        assert_eq!(s.keys.chunk_size, 256);
        assert_eq!(s.keys.hash_seed, 0);
        assert!(s.keys.save_unfull_chunk);
        assert_eq!(s.tiers.cpu_bytes, Some(5 << 30));
        assert_eq!(s.tiers.disk, None);
        assert_eq!(s.tiers.gpu_bytes, 0);
        assert_eq!(s.pd, None);
        assert_eq!(s.remote, None);
        let d = b.disk_tier("/tmp/x", 1 << 30).settings().tiers.disk.clone();
        assert_eq!(d.map(|d| d.write_queue), Some(64));
    }

    #[tokio::test]
    async fn bad_settings_are_refused_naming_the_key() {
        let model = ModelSpec::llama_3_1_8b();
        let err = Engine::builder(model.clone())
            .chunk_size(0)
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("chunk_size"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = Engine::builder(model)
            .disk_tier(dir.path(), 0)
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("max_local_disk_size"), "{err}");
    }

    #[tokio::test]
    async fn a_built_engine_stores_and_retrieves() {
        let mut model = ModelSpec::llama_3_1_8b();
        model.layers = 2;
        let engine = Engine::builder(model.clone())
            .chunk_size(16)
            .cpu_tier(Some(64 << 20))
            .build()
            .await
            .unwrap();
        let tokens: Vec<u32> = (0..40).collect();
        let kv: Vec<u8> = (0..tokens.len() * model.bytes_per_token())
            .map(|i| (i % 251) as u8)
            .collect();
        engine.store(&tokens, &kv).await.unwrap();
        assert_eq!(engine.lookup(&tokens).await.unwrap(), 40);
        let mut out = vec![0u8; kv.len()];
        assert_eq!(engine.retrieve(&tokens, &mut out).await.unwrap().tokens, 40);
        assert_eq!(out, kv);
    }
}
