//! How close the relay is to its memory cap: the memory cgroup it runs in (cgroup v2
//! `memory.current` / `memory.max`, or v1 `memory.usage_in_bytes` / `memory.limit_in_bytes`),
//! read from /proc and /sys. A relay under a cap refuses new flows before the kernel's OOM
//! killer takes everything down.

use std::path::{Path, PathBuf};

/// Where the process's memory cgroup keeps its usage and limit.
#[derive(Debug, Clone)]
pub struct CgroupMemory {
    usage: PathBuf,
    limit: PathBuf,
}

impl CgroupMemory {
    /// Finds the memory cgroup of this process; `None` when there is none to read.
    pub fn find() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        Self::from_proc(&text, Path::new("/sys/fs/cgroup"))
    }

    /// The cgroup files named by a `/proc/self/cgroup` text under the given mount root.
    pub fn from_proc(text: &str, root: &Path) -> Option<Self> {
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                let dir = root.join("memory").join(rel);
                let m = Self {
                    usage: dir.join("memory.usage_in_bytes"),
                    limit: dir.join("memory.limit_in_bytes"),
                };
                if m.usage.is_file() {
                    return Some(m);
                }
            }
            if controllers.is_empty() {
                let dir = root.join(rel);
                let m = Self {
                    usage: dir.join("memory.current"),
                    limit: dir.join("memory.max"),
                };
                if m.usage.is_file() {
                    return Some(m);
                }
            }
        }
        None
    }

    /// (bytes used, limit); the limit is `None` when the cgroup has none.
    pub fn read(&self) -> Option<(u64, Option<u64>)> {
        let usage = std::fs::read_to_string(&self.usage)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let limit = std::fs::read_to_string(&self.limit).ok()?;
        // v2 writes "max"; v1 writes a huge number when unlimited.
        let limit = limit.trim().parse::<u64>().ok().filter(|l| *l < (1 << 62));
        Some((usage, limit))
    }
}

/// True when `usage` is above `percent` of `limit`.
pub fn over(usage: u64, limit: Option<u64>, percent: u8) -> bool {
    match limit {
        Some(l) if percent > 0 => usage as u128 * 100 > l as u128 * u128::from(percent),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_and_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("memory/a/b");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "100\n").unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let m = CgroupMemory::from_proc("5:cpu:/x\n4:memory:/a/b\n0::/c\n", dir.path()).unwrap();
        assert_eq!(m.read(), Some((100, None)));
        std::fs::write(v1.join("memory.limit_in_bytes"), "200\n").unwrap();
        assert_eq!(m.read(), Some((100, Some(200))));

        let v2 = dir.path().join("c");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.current"), "50\n").unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        let m = CgroupMemory::from_proc("0::/c\n", dir.path()).unwrap();
        assert_eq!(m.read(), Some((50, None)));
        assert!(CgroupMemory::from_proc("0::/nowhere\n", dir.path()).is_none());
    }

    #[test]
    fn over_the_high_mark() {
        assert!(!over(84, Some(100), 85));
        assert!(over(86, Some(100), 85));
        assert!(!over(99, None, 85));
        assert!(!over(99, Some(100), 0));
    }
}
