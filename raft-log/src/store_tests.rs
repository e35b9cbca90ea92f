//! The store against openraft's own storage test suite, and the flusher's
//! durability promise through the openraft API.

use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use futures_util::StreamExt;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::RaftSnapshotBuilder;
use openraft::StorageError;
use openraft::alias::LogIdOf;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::StoredMembershipOf;
use openraft::entry::RaftEntry;
use openraft::impls::Vote;
use openraft::storage::EntryResponder;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::TypeConfigExt;
use tempfile::TempDir;

use crate::config::LogConfig;
use crate::fault::CrashMode;
use crate::fault::FaultFs;
use crate::log::CommitLog;
use crate::store::AdvLeaderId;
use crate::store::LogBytes;
use crate::store::RaftLogStore;

openraft::declare_raft_types!(
    pub TestConfig:
        D = LogBytes,
        R = (),
);

type C = TestConfig;

/// A minimal in-memory state machine: the suite needs one beside the log.
#[derive(Clone, Default)]
struct MemSm {
    inner: Arc<Mutex<SmState>>,
}

#[derive(Default)]
struct SmState {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    applied_data: Vec<LogBytes>,
    snapshot: Option<SnapshotMetaOf<C>>,
}

impl RaftSnapshotBuilder<C> for MemSm {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        let mut st = self.inner.lock().unwrap();
        let meta = SnapshotMetaOf::<C> { last_log_id: st.last_applied, last_membership: st.membership.clone() };
        st.snapshot = Some(meta.clone());
        Ok(SnapshotOf::<C, Vec<u8>> { meta, snapshot: Vec::new() })
    }
}

impl RaftStateMachine<C> for MemSm {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = MemSm;

    async fn applied_state(&mut self) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let st = self.inner.lock().unwrap();
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures_util::Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + Send,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            {
                let mut st = self.inner.lock().unwrap();
                st.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(d) => st.applied_data.push(d.clone()),
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m.clone())
                    }
                }
            }
            if let Some(r) = responder {
                r.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, _snapshot: Vec<u8>) -> Result<(), io::Error> {
        let mut st = self.inner.lock().unwrap();
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        st.snapshot = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        let st = self.inner.lock().unwrap();
        Ok(st.snapshot.clone().map(|meta| SnapshotOf::<C, Vec<u8>> { meta, snapshot: Vec::new() }))
    }
}

struct Builder;

impl StoreBuilder<C, RaftLogStore<C>, MemSm, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, RaftLogStore<C>, MemSm), StorageError<C>> {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = CommitLog::open(dir.path(), LogConfig::small_for_tests(), Arc::new(FaultFs::new())).unwrap();
        let store = RaftLogStore::new(Arc::new(log)).unwrap();
        Ok((dir, store, MemSm::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}

fn normal(term: u64, index: u64, data: &'static str) -> <C as openraft::RaftTypeConfig>::Entry {
    openraft::Entry::new_normal(LogId::new(AdvLeaderId { term, node_id: 1 }, index), LogBytes::from(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_callback_means_durable() {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::new();
    let open = || {
        let (log, _) = CommitLog::open(dir.path(), LogConfig::small_for_tests(), Arc::new(fs.clone())).unwrap();
        RaftLogStore::<C>::new(Arc::new(log)).unwrap()
    };
    let mut store = open();
    store.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
    for (i, data) in ["a", "b", "c"].into_iter().enumerate() {
        let (tx, rx) = C::oneshot();
        store.append([normal(3, i as u64, data)], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }
    // Written but never reported flushed: may be lost.
    store.append([normal(3, 3, "d")], IOFlushed::noop()).await.unwrap();
    drop(store);
    fs.crash(CrashMode::LoseUnsynced).unwrap();

    let mut store = open();
    let state = store.get_log_state().await.unwrap();
    assert!(state.last_log_id.unwrap().index >= 2, "every entry reported flushed survives");
    let mut reader = store.get_log_reader().await;
    let entries = reader.try_get_log_entries(0..3).await.unwrap();
    let bodies: Vec<_> = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(d) => d.0.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(bodies, vec!["a", "b", "c"]);
    assert_eq!(reader.read_vote().await.unwrap(), Some(Vote::new_committed(3, 1)));
}
