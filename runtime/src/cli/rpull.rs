//! `lazypull rpull`: pull an image into containerd lazily, through the lazypull snapshotter.
//!
//! containerd 1.6's own `ctr images pull` always downloads every layer; this is the client
//! side of a lazy pull (what `ctr-remote images rpull` does for stargz-snapshotter), speaking
//! containerd's gRPC API with the `containerd-client` crate:
//!
//! 1. resolve the image in the registry (manifest and config only);
//! 2. under a lease (so containerd's garbage collector keeps everything until the image
//!    record exists), write manifest and config into containerd's content store with the GC
//!    labels containerd's own pull sets (manifest -> config and layers, config -> the top
//!    snapshot);
//! 3. for each layer, base first, `Prepare` a snapshot for the `lazypull` snapshotter with
//!    `containerd.io/snapshot.ref` = the layer's chain ID and the remote labels (image
//!    reference, layer digest, size, media type, annotations). `AlreadyExists` means the
//!    daemon mounted the layer lazily; a normal answer means it cannot (no TOC), and the
//!    layer is downloaded into the content store and applied by containerd's diff service,
//!    then committed under the chain ID, exactly as containerd would unpack it;
//! 4. create (or update) the image record.
//!
//! Then `ctr run --snapshotter lazypull IMAGE ID CMD` finds the image unpacked and starts it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, Image, Info as ContentInfo,
    UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use lazypull_fetcher::{Digest, Platform, Reference};
use lazypull_fs::toc::time::format_rfc3339;
use lazypull_snapshotter::{
    LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
};
use sha2::Digest as _;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::config::Settings;

use crate::daemon::snapshots::{LABEL_ANNOTATIONS, LABEL_MEDIA_TYPE, LABEL_SIZE};
use lazypull_fs::estargz::TOC_DIGEST_ANNOTATION;
/// containerd's limit on one label (key and value).
const MAX_LABEL: usize = 4096;
/// Content is written in messages of this size (gRPC's default limit is 4 MiB).
const WRITE_CHUNK: usize = 1 << 20;

/// `lazypull rpull` arguments.
#[derive(Debug, clap::Args)]
pub struct RpullArgs {
    /// containerd's gRPC socket. (The global `--address` names lazypull's own socket, hence
    /// this name.)
    #[arg(
        long = "containerd-address",
        value_name = "SOCKET",
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_address: PathBuf,
    /// containerd namespace.
    #[arg(
        short = 'n',
        long,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Talk plain HTTP to the image's registry (this command only; the daemon reads layers
    /// with its own settings: `--insecure-registry`, hosts.toml, localhost).
    #[arg(long)]
    pub plain_http: bool,
    /// containerd snapshotter name of the lazypull proxy plugin.
    #[arg(long, default_value = "lazypull")]
    pub snapshotter: String,
    /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
    #[arg(long)]
    pub platform: Option<String>,
    /// Image reference, e.g. `registry.example.com/app:1.0`.
    pub image: String,
}

/// containerd calls with namespace and lease headers.
struct Ctx {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", l);
        }
        r
    }
}

/// RFC 3339 UTC time `secs` after the epoch (for `containerd.io/gc.expire`); a time past
/// year 9999 cannot be written and is clamped to its end.
fn rfc3339(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    format_rfc3339(secs).unwrap_or_else(|| "9999-12-31T23:59:59Z".to_string())
}

/// Chain IDs of `diff_ids` (base first), as the OCI image spec defines them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let id = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(id);
    }
    out
}

fn status_ctx(what: impl std::fmt::Display) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    let what = what.to_string();
    move |s| anyhow::anyhow!("{what}: containerd said {:?}: {}", s.code(), s.message())
}

/// Writes `data` (read from `source`) into containerd's content store as `digest`, with
/// `labels`. Content already there only gets the labels.
async fn write_content(
    ctx: &Ctx,
    digest: &str,
    size: u64,
    source: ContentSource,
    labels: HashMap<String, String>,
) -> Result<()> {
    let reference = format!(
        "lazypull-rpull-{}-{}",
        digest.trim_start_matches("sha256:"),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
    let first = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: reference.clone(),
        total: size as i64,
        expected: digest.to_string(),
        ..Default::default()
    };
    tx.send(first).await.ok();
    let feeder = {
        let digest = digest.to_string();
        let labels = labels.clone();
        let reference = reference.clone();
        tokio::spawn(async move {
            let msg = |action: WriteAction, offset: u64, data: Vec<u8>| WriteContentRequest {
                action: action as i32,
                r#ref: reference.clone(),
                total: size as i64,
                expected: digest.clone(),
                offset: offset as i64,
                data,
                labels: if action == WriteAction::Commit {
                    labels.clone()
                } else {
                    HashMap::new()
                },
            };
            let mut offset = 0u64;
            match source {
                ContentSource::Bytes(b) => {
                    for c in b.chunks(WRITE_CHUNK) {
                        if tx
                            .send(msg(WriteAction::Write, offset, c.to_vec()))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                        offset += c.len() as u64;
                    }
                }
                ContentSource::File(p) => {
                    use tokio::io::AsyncReadExt;
                    let mut f = tokio::fs::File::open(&p).await?;
                    loop {
                        let mut buf = vec![0u8; WRITE_CHUNK];
                        let n = f.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        buf.truncate(n);
                        if tx.send(msg(WriteAction::Write, offset, buf)).await.is_err() {
                            return Ok(());
                        }
                        offset += n as u64;
                    }
                }
            }
            let _ = tx.send(msg(WriteAction::Commit, offset, Vec::new())).await;
            Ok::<(), std::io::Error>(())
        })
    };
    let stream = tokio_stream_from(rx);
    let mut client = ContentClient::new(ctx.channel.clone());
    let result = async {
        let mut responses = client.write(ctx.req(stream)).await?.into_inner();
        while responses.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await;
    feeder.abort();
    match result {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            // Already in the store: make sure it carries our GC labels.
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            client
                .update(ctx.req(UpdateRequest {
                    info: Some(ContentInfo {
                        digest: digest.to_string(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }))
                .await
                .map_err(status_ctx(format!("labelling content {digest}")))?;
            Ok(())
        }
        Err(s) => Err(status_ctx(format!("writing content {digest}"))(s)),
    }
}

/// Where content to write comes from.
enum ContentSource {
    Bytes(Vec<u8>),
    File(PathBuf),
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<WriteContentRequest>,
) -> impl futures::Stream<Item = WriteContentRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// What one layer became.
enum Outcome {
    Present,
    Remote,
    Applied,
}

/// Runs `lazypull rpull`.
pub async fn rpull(settings: &Settings, args: RpullArgs) -> Result<()> {
    let started = Instant::now();
    let reference: Reference = args.image.parse()?;
    let mut settings = settings.clone();
    if args.plain_http {
        settings
            .insecure_registries
            .push(reference.api_host().to_string());
        settings
            .insecure_registries
            .push(reference.registry().to_string());
    }
    let registry = super::registry(&settings);
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let resolved = registry.resolve(&reference, &platform).await?;
    let manifest = resolved
        .image()
        .context("the registry returned an index where an image manifest was expected")?;
    let config_desc = manifest.config();
    let config_digest: Digest = config_desc.digest().to_string().parse()?;
    let config_bytes = registry
        .fetch_blob(&reference, &config_digest)
        .await
        .context("fetching the image config")?;
    let config: serde_json::Value =
        serde_json::from_slice(&config_bytes).context("the image config is not JSON")?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("the image config has no rootfs.diff_ids")?
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    let layers = manifest.layers();
    if layers.is_empty() || layers.len() != diff_ids.len() {
        bail!(
            "the image has {} layers but its config lists {} diff IDs",
            layers.len(),
            diff_ids.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let manifest_digest = resolved.manifest.digest.to_string();
    let image_name = reference.to_string();
    eprintln!(
        "{image_name}: manifest {manifest_digest}, {} layers",
        layers.len()
    );

    let channel = containerd_client::connect(&args.containerd_address)
        .await
        .with_context(|| {
            format!(
                "connecting to containerd at {} (set --containerd-address)",
                args.containerd_address.display()
            )
        })?;
    let mut ctx = Ctx {
        channel,
        namespace: args.namespace.clone(),
        lease: None,
    };
    let lease_id = format!(
        "lazypull-rpull-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let expire = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let mut leases = LeasesClient::new(ctx.channel.clone());
    leases
        .create(ctx.req(CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339(expire))]),
        }))
        .await
        .map_err(status_ctx("creating a lease"))?;
    ctx.lease = Some(lease_id.clone());
    let result = pull_with_lease(
        &ctx,
        &args,
        &registry,
        &reference,
        &image_name,
        &resolved,
        &config_bytes,
        &diff_ids,
        &chains,
    )
    .await;
    ctx.lease = None;
    let _ = leases
        .delete(ctx.req(DeleteRequest {
            id: lease_id,
            sync: false,
        }))
        .await;
    let (remote, applied, present) = result?;
    println!(
        "{image_name}: {} layers ({remote} lazy, {applied} downloaded, {present} already \
         present), {:.2} s",
        layers.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn pull_with_lease(
    ctx: &Ctx,
    args: &RpullArgs,
    registry: &lazypull_fetcher::Registry,
    reference: &Reference,
    image_name: &str,
    resolved: &lazypull_fetcher::registry::ResolvedImage,
    config_bytes: &[u8],
    diff_ids: &[String],
    chains: &[String],
) -> Result<(usize, usize, usize)> {
    let manifest = resolved.image().context("not an image manifest")?;
    let layers = manifest.layers();
    let manifest_digest = resolved.manifest.digest.to_string();
    let config_digest = manifest.config().digest().to_string();
    let source_label = format!("containerd.io/distribution.source.{}", reference.registry());
    // Content: manifest -> config + layers, config -> top snapshot (containerd's GC labels).
    let mut mlabels = HashMap::from([
        (
            "containerd.io/gc.ref.content.config".to_string(),
            config_digest.clone(),
        ),
        (source_label.clone(), reference.repository().to_string()),
    ]);
    for (i, l) in layers.iter().enumerate() {
        mlabels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest().to_string(),
        );
    }
    let clabels = HashMap::from([
        (
            format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
            chains.last().cloned().unwrap_or_default(),
        ),
        (source_label, reference.repository().to_string()),
    ]);
    write_content(
        ctx,
        &config_digest,
        config_bytes.len() as u64,
        ContentSource::Bytes(config_bytes.to_vec()),
        clabels,
    )
    .await?;
    write_content(
        ctx,
        &manifest_digest,
        resolved.manifest.bytes.len() as u64,
        ContentSource::Bytes(resolved.manifest.bytes.to_vec()),
        mlabels,
    )
    .await?;

    let all_layers: String = {
        let mut s = String::new();
        for l in layers {
            let d = l.digest().to_string();
            if LABEL_CRI_IMAGE_LAYERS.len() + s.len() + d.len() + 1 > MAX_LABEL {
                break;
            }
            if !s.is_empty() {
                s.push(',');
            }
            s.push_str(&d);
        }
        s
    };
    let (mut remote, mut applied, mut present) = (0, 0, 0);
    let mut snapshots = SnapshotsClient::new(ctx.channel.clone());
    for (i, l) in layers.iter().enumerate() {
        let chain = &chains[i];
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        let digest = l.digest().to_string();
        let short: String = digest.chars().take(19).collect();
        let mut labels = HashMap::from([
            (LABEL_SNAPSHOT_REF.to_string(), chain.clone()),
            (LABEL_CRI_IMAGE_REF.to_string(), image_name.to_string()),
            (LABEL_CRI_LAYER_DIGEST.to_string(), digest.clone()),
            (
                LABEL_CRI_MANIFEST_DIGEST.to_string(),
                manifest_digest.clone(),
            ),
            (LABEL_CRI_IMAGE_LAYERS.to_string(), all_layers.clone()),
            (LABEL_SIZE.to_string(), l.size().to_string()),
            (LABEL_MEDIA_TYPE.to_string(), l.media_type().to_string()),
        ]);
        let annotations = l.annotations().clone().unwrap_or_default();
        if let Some(toc) = annotations.get(TOC_DIGEST_ANNOTATION) {
            labels.insert(TOC_DIGEST_ANNOTATION.to_string(), toc.clone());
        }
        if !annotations.is_empty() {
            let json = serde_json::to_string(&annotations)?;
            if LABEL_ANNOTATIONS.len() + json.len() <= MAX_LABEL {
                labels.insert(LABEL_ANNOTATIONS.to_string(), json);
            }
        }
        let outcome = prepare_layer(
            ctx,
            &mut snapshots,
            args,
            registry,
            reference,
            l,
            &diff_ids[i],
            chain,
            parent,
            labels,
        )
        .await
        .with_context(|| format!("layer {digest}"))?;
        let what = match outcome {
            Outcome::Present => {
                present += 1;
                "already unpacked"
            }
            Outcome::Remote => {
                remote += 1;
                "mounted lazily"
            }
            Outcome::Applied => {
                applied += 1;
                "no TOC: downloaded and applied by containerd"
            }
        };
        eprintln!("{short}: {what}");
    }

    let target = Descriptor {
        media_type: resolved.manifest.media_type.clone(),
        digest: manifest_digest.clone(),
        size: resolved.manifest.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    let image = Image {
        name: image_name.to_string(),
        labels: HashMap::new(),
        target: Some(target),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(ctx.channel.clone());
    match images
        .create(ctx.req(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctx.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(status_ctx(format!("updating image {image_name}")))?;
        }
        Err(s) => return Err(status_ctx(format!("creating image {image_name}"))(s)),
    }
    Ok((remote, applied, present))
}

#[allow(clippy::too_many_arguments)]
async fn prepare_layer(
    ctx: &Ctx,
    snapshots: &mut SnapshotsClient<Channel>,
    args: &RpullArgs,
    registry: &lazypull_fetcher::Registry,
    reference: &Reference,
    layer: &oci_spec::image::Descriptor,
    diff_id: &str,
    chain: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Outcome> {
    let sn = args.snapshotter.clone();
    match snapshots
        .stat(ctx.req(StatSnapshotRequest {
            snapshotter: sn.clone(),
            key: chain.to_string(),
        }))
        .await
    {
        Ok(_) => return Ok(Outcome::Present),
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(status_ctx(format!("snapshotter {sn:?}: stat {chain}"))(s)),
    }
    let key = format!(
        "extract-{}-{chain}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let mounts = match snapshots
        .prepare(ctx.req(PrepareSnapshotRequest {
            snapshotter: sn.clone(),
            key: key.clone(),
            parent: parent.to_string(),
            labels,
        }))
        .await
    {
        Err(s) if s.code() == Code::AlreadyExists => return Ok(Outcome::Remote),
        Err(s) => {
            return Err(status_ctx(format!(
                "snapshotter {sn:?}: prepare (is lazypull's proxy plugin configured in \
                 containerd, and is `lazypull serve` running?)"
            ))(s))
        }
        Ok(r) => r.into_inner().mounts,
    };
    // Not served lazily: download, let containerd apply it, commit under the chain ID.
    let applied = async {
        let digest: Digest = layer.digest().to_string().parse()?;
        let tmp = tempfile::Builder::new()
            .prefix("lazypull-rpull-")
            .tempdir()
            .context("creating a temporary directory")?;
        let file = tmp.path().join("blob");
        registry
            .download_blob(reference, &digest, Some(layer.size()), &file, &|_| {})
            .await
            .context("downloading the layer")?;
        write_content(
            ctx,
            &digest.to_string(),
            layer.size(),
            ContentSource::File(file.clone()),
            HashMap::new(),
        )
        .await?;
        drop(tmp);
        let mut diff = DiffClient::new(ctx.channel.clone());
        let resp = diff
            .apply(ctx.req(ApplyRequest {
                diff: Some(Descriptor {
                    media_type: layer.media_type().to_string(),
                    digest: digest.to_string(),
                    size: layer.size() as i64,
                    annotations: HashMap::new(),
                }),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            }))
            .await
            .map_err(status_ctx("applying the layer"))?
            .into_inner();
        let got = resp.applied.map(|d| d.digest).unwrap_or_default();
        if got != diff_id {
            bail!("the applied layer has diff ID {got}, the image config says {diff_id}");
        }
        snapshots
            .commit(ctx.req(CommitSnapshotRequest {
                snapshotter: sn.clone(),
                name: chain.to_string(),
                key: key.clone(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(status_ctx("committing the snapshot"))?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = applied {
        let _ = snapshots
            .remove(ctx.req(RemoveSnapshotRequest {
                snapshotter: sn,
                key,
            }))
            .await;
        return Err(e);
    }
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(c[1], want);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }
}
