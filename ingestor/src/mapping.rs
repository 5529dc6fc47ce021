//! `jetmq-ingestor mapping`: prints or writes the nats-server `mappings` block.

use std::path::{Path, PathBuf};

use jetmq_common::shares::{mapping_block, MappingMode, ShareError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Hash of the whole subject: a topic always lands on the same share (keeps order).
    Partition,
    /// Random per message with the given percentages (no per-topic order).
    Weighted,
}

/// The mapping block for `ingestors` in `mode`.
pub fn generate(ingestors: u32, mode: Mode, weights: Option<&[u32]>) -> Result<String, ShareError> {
    let mode = match (mode, weights) {
        (Mode::Partition, _) => MappingMode::Partition,
        (Mode::Weighted, Some(w)) => MappingMode::Weighted(w.to_vec()),
        // One ingestor needs no weights: everything goes to share 0.
        (Mode::Weighted, None) if ingestors == 1 => MappingMode::Weighted(vec![100]),
        (Mode::Weighted, None) => return Err(ShareError::MissingWeights),
    };
    mapping_block(ingestors, &mode)
}

/// Writes `block` to `path` atomically (temp file + rename), so a reload never reads half.
pub fn write_atomically(path: &Path, block: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "mappings.conf".to_owned());
    let tmp: PathBuf = match dir {
        Some(d) => d.join(format!(".{file_name}.tmp")),
        None => PathBuf::from(format!(".{file_name}.tmp")),
    };
    std::fs::write(&tmp, block)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert!(generate(2, Mode::Partition, None)
            .expect("ok")
            .contains("partition(2)"));
        assert!(generate(2, Mode::Weighted, Some(&[70, 30]))
            .expect("ok")
            .contains("weight: 70%"));
        assert_eq!(
            generate(2, Mode::Weighted, None),
            Err(ShareError::MissingWeights)
        );
        assert!(generate(1, Mode::Weighted, None)
            .expect("ok")
            .contains("\"jetmq.s.0.>\""));
    }

    #[test]
    fn writes_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mappings.conf");
        write_atomically(&path, "x").expect("write");
        write_atomically(&path, "y").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "y");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }
}
