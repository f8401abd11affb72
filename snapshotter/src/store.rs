//! Snapshot metadata in redb.
//!
//! redb rather than SQLite: it is pure Rust (no C toolchain or bundled libsqlite3 to build on a
//! 2-core machine), its write transactions are ACID with copy-on-write pages (a crash leaves the
//! last committed state), and the data is a plain key → record map that needs no SQL.
use crate::remote::Labels;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Snapshot key → JSON [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters (`next_id`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Db(String),
    #[error("metadata record {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Nanoseconds since the Unix epoch.
pub type Nanos = i128;

pub fn now() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as Nanos)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory `snapshots/<id>`; stays the same across Commit.
    pub id: u64,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: Labels,
    pub created: Nanos,
    pub updated: Nanos,
    /// Disk usage (bytes, inodes) measured at Commit; None for active snapshots and views.
    pub usage: Option<(i64, i64)>,
    /// Committed as a lazily served CORA layer: its content comes from the remote backend.
    #[serde(default)]
    pub remote: bool,
    /// For actives and views over remote layers: the attached stack (key of the topmost remote
    /// ancestor) this snapshot holds a reference on.
    #[serde(default)]
    pub stack: Option<String>,
}

pub struct Store {
    db: Database,
}

pub type WriteTxn = redb::WriteTransaction;

fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        // Create the tables once so read transactions never see them missing.
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Store { db })
    }

    pub fn begin(&self) -> Result<WriteTxn, StoreError> {
        Ok(self.db.begin_write()?)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    pub fn tx_get(tx: &WriteTxn, key: &str) -> Result<Option<Record>, StoreError> {
        let table = tx.open_table(SNAPSHOTS)?;
        let value = table.get(key)?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub fn tx_put(tx: &WriteTxn, key: &str, rec: &Record) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Db(e.to_string()))?;
        tx.open_table(SNAPSHOTS)?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    pub fn tx_delete(tx: &WriteTxn, key: &str) -> Result<(), StoreError> {
        tx.open_table(SNAPSHOTS)?.remove(key)?;
        Ok(())
    }

    /// Whether any snapshot names `key` as its parent.
    pub fn tx_has_children(tx: &WriteTxn, key: &str) -> Result<bool, StoreError> {
        let table = tx.open_table(SNAPSHOTS)?;
        for entry in table.iter()? {
            let (k, v) = entry?;
            if decode(k.value(), v.value())?.parent.as_deref() == Some(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn tx_next_id(tx: &WriteTxn) -> Result<u64, StoreError> {
        let mut meta = tx.open_table(META)?;
        let id = meta.get("next_id")?.map(|v| v.value()).unwrap_or(1);
        meta.insert("next_id", id + 1)?;
        Ok(id)
    }

    pub fn commit(tx: WriteTxn) -> Result<(), StoreError> {
        Ok(tx.commit()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, parent: Option<&str>) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: parent.map(str::to_owned),
            labels: Labels::new(),
            created: now(),
            updated: now(),
            usage: None,
            remote: false,
            stack: None,
        }
    }

    #[test]
    fn persists_and_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        {
            let s = Store::open(&path).unwrap();
            let tx = s.begin().unwrap();
            let id = Store::tx_next_id(&tx).unwrap();
            Store::tx_put(&tx, "a", &rec(id, None)).unwrap();
            Store::commit(tx).unwrap();
            // Dropped without commit: must leave no trace.
            let tx = s.begin().unwrap();
            Store::tx_put(&tx, "b", &rec(9, Some("a"))).unwrap();
            drop(tx);
        }
        let s = Store::open(&path).unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a");
        let tx = s.begin().unwrap();
        assert_eq!(Store::tx_next_id(&tx).unwrap(), 2);
        assert!(!Store::tx_has_children(&tx, "a").unwrap());
        Store::tx_put(&tx, "b", &rec(2, Some("a"))).unwrap();
        assert!(Store::tx_has_children(&tx, "a").unwrap());
    }

    #[test]
    fn corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("m.redb")).unwrap();
        let tx = s.begin().unwrap();
        tx.open_table(SNAPSHOTS)
            .unwrap()
            .insert("x", b"{not json".as_slice())
            .unwrap();
        Store::commit(tx).unwrap();
        assert!(matches!(s.get("x"), Err(StoreError::Corrupt { .. })));
    }
}
