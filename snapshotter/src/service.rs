//! `containerd.services.snapshots.v1.Snapshots` over [`Snapshotter`].
//!
//! Each call runs on the blocking pool: metadata commits fsync and Commit walks the upper dir.
//! List applies containerd's `filters` (see [`crate::filters`]): containerd's proxy client
//! does not filter again, and its GC and CRI rely on filtered walks.
use crate::filters::Filters;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::snapshots::{self as pb};
use crate::proto::types::Mount as PbMount;
use crate::snapshotter::{Error, Info, Mount, Snapshotter};
use crate::store::{Kind, Nanos};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => Status::not_found(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::Internal(_) => Status::internal(msg),
        }
    }
}

#[derive(Clone)]
pub struct Service {
    sn: Arc<Snapshotter>,
}

impl Service {
    pub fn new(sn: Arc<Snapshotter>) -> Service {
        Service { sn }
    }

    /// Runs `f` on the blocking pool and counts the call in the metrics.
    async fn call<T, F>(&self, rpc: &'static str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    {
        let sn = self.sn.clone();
        let result = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{rpc} task failed: {e}")))?;
        // AlreadyExists from Prepare is the remote-layer protocol, not a failure.
        let ok =
            result.is_ok() || matches!(result, Err(Error::AlreadyExists(_)) if rpc == "Prepare");
        self.sn.metrics().rpc(rpc, ok);
        if let Err(e) = &result {
            tracing::debug!(rpc, "{e}");
        }
        result.map_err(Status::from)
    }
}

fn mounts(ms: Vec<Mount>) -> Vec<PbMount> {
    ms.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(n: Nanos) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

fn pb_info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

/// Snapshots per List message: keeps each message far below gRPC's 4 MiB default limit.
const LIST_BATCH: usize = 100;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .call("Prepare", move |sn| {
                sn.prepare(&r.key, &r.parent, r.labels.into_iter().collect())
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .call("View", move |sn| {
                sn.view(&r.key, &r.parent, r.labels.into_iter().collect())
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let ms = self.call("Mounts", move |sn| sn.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.call("Commit", move |sn| {
            sn.commit(&r.name, &r.key, r.labels.into_iter().collect())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.call("Remove", move |sn| sn.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = self.call("Stat", move |sn| sn.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(pb_info(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(info) = r.info else {
            self.sn.metrics().rpc("Update", false);
            return Err(Status::invalid_argument("Update needs info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let new = Info {
            name: info.name,
            parent: None,
            kind: Kind::Committed,
            created: 0,
            updated: 0,
            labels: info.labels.into_iter().collect(),
        };
        let updated = self
            .call("Update", move |sn| sn.update(new, &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(pb_info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = Filters::parse(&req.into_inner().filters)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut all = self.call("List", |sn| sn.list()).await?;
        all.retain(|i| filters.matches(i));
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(LIST_BATCH)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(pb_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.call("Usage", move |sn| sn.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call("Cleanup", |sn| sn.cleanup()).await?;
        Ok(Response::new(()))
    }
}
