//! The gRPC face of [`Snapshotter`]: containerd's `containerd.services.snapshots.v1.Snapshots`
//! on a unix socket, errors mapped to the codes containerd's errdefs read.

use std::path::Path;
use std::sync::Arc;

use containerd_client::services::v1::snapshots as api;
use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::grpc::snapshots_server::{Snapshots, SnapshotsServer};
use crate::grpc::Empty;
use crate::meta::{Kind, MetaError, Record};
use crate::{Error, RemoteLayers, Snapshotter};

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::Meta(MetaError::NotFound(_)) => Status::not_found(msg),
            Error::Meta(MetaError::AlreadyExists(_)) => Status::already_exists(msg),
            Error::Meta(MetaError::FailedPrecondition(_)) => Status::failed_precondition(msg),
            Error::Meta(MetaError::InvalidArgument(_)) | Error::Filter(_) => {
                Status::invalid_argument(msg)
            }
            Error::Unavailable { .. } => Status::unavailable(msg),
            Error::Meta(MetaError::Store(_)) | Error::Io { .. } => Status::internal(msg),
        }
    }
}

fn timestamp(nanos: i64) -> Timestamp {
    Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

fn info(r: &Record) -> api::Info {
    api::Info {
        name: r.name.clone(),
        parent: r.parent.clone().unwrap_or_default(),
        kind: match r.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(r.created)),
        updated_at: Some(timestamp(r.updated)),
        labels: r.labels.clone().into_iter().collect(),
    }
}

fn parent(p: &str) -> Option<&str> {
    (!p.is_empty()).then_some(p)
}

/// The gRPC service over a shared [`Snapshotter`].
pub struct SnapshotsService<R: RemoteLayers> {
    inner: Arc<Snapshotter<R>>,
}

impl<R: RemoteLayers> SnapshotsService<R> {
    /// Serves `snapshotter`.
    pub fn new(snapshotter: Arc<Snapshotter<R>>) -> Self {
        SnapshotsService { inner: snapshotter }
    }
}

/// Logs a failed call at debug level (containerd probes with NotFound and AlreadyExists all
/// the time) or warn level (everything else) and turns it into a status.
fn fail(method: &str, key: &str, e: Error) -> Status {
    match &e {
        Error::Meta(MetaError::NotFound(_) | MetaError::AlreadyExists(_)) => {
            tracing::debug!(method, key, error = %e, "snapshots call")
        }
        _ => tracing::warn!(method, key, error = %e, "snapshots call failed"),
    }
    e.into()
}

#[tonic::async_trait]
impl<R: RemoteLayers> Snapshots for SnapshotsService<R> {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .inner
            .prepare(&r.key, parent(&r.parent), r.labels)
            .await
            .map_err(|e| fail("Prepare", &r.key, e))?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .inner
            .view(&r.key, parent(&r.parent), r.labels)
            .await
            .map_err(|e| fail("View", &r.key, e))?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .inner
            .mounts(&r.key)
            .await
            .map_err(|e| fail("Mounts", &r.key, e))?;
        Ok(Response::new(api::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.inner
            .commit(&r.name, &r.key, r.labels)
            .await
            .map_err(|e| fail("Commit", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        self.inner
            .remove(&r.key)
            .await
            .map_err(|e| fail("Remove", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let rec = self
            .inner
            .stat(&r.key)
            .map_err(|e| fail("Stat", &r.key, e))?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(info(&rec)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("Update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let rec = self
            .inner
            .update(&i.name, i.labels, &paths)
            .map_err(|e| fail("Update", &i.name, e))?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(info(&rec)),
        }))
    }

    type ListStream =
        futures::stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let records = self
            .inner
            .list(&r.filters)
            .map_err(|e| fail("List", &r.filters.join(" | "), e))?;
        // containerd's own server sends batches of 100.
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = records
            .chunks(100)
            .map(|c| {
                Ok(api::ListSnapshotsResponse {
                    info: c.iter().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let r = request.into_inner();
        let u = self
            .inner
            .usage(&r.key)
            .await
            .map_err(|e| fail("Usage", &r.key, e))?;
        Ok(Response::new(api::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<Empty>, Status> {
        let n = self.inner.cleanup().map_err(|e| fail("Cleanup", "", e))?;
        if n > 0 {
            tracing::info!(count = n, "cleanup removed unused snapshot directories");
        }
        Ok(Response::new(()))
    }
}

/// Binds the snapshotter socket at `socket` (replacing a stale socket file), mode 0600.
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves on an already bound listener until `shutdown` completes.
pub async fn serve_listener<R: RemoteLayers>(
    snapshotter: Arc<Snapshotter<R>>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), std::io::Error> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(snapshotter)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}
