//! Containers: a writable overlay root on the image's layer mounts, an OCI bundle directory, and
//! a record of what the supervising `lazypull` process reported. The OCI runtime itself is
//! run by the supervisor (the `run` command, or its detached form), so stdio, terminals and
//! exit codes pass straight through; the daemon asks the runtime for state and signals it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::store::{self, ContainerRecord};
use super::{mounts, Events, Shared};
use crate::api::{ContainerInfo, Created, Reply};
use crate::runtime::Runtime;

fn container_dir(root: &Path, id: &str) -> PathBuf {
    root.join("containers").join(id)
}

fn save(root: &Path, c: &ContainerRecord) -> Result<()> {
    store::save(&container_dir(root, &c.id).join("container.json"), c)
}

/// A name is what docker accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && n.len() <= 128
}

fn random_id() -> String {
    let mut bytes = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    hex::encode(bytes)
}

/// Pulls the image if needed and prepares the container's root and bundle.
pub async fn create(
    state: &Shared,
    image: &str,
    platform: Option<&str>,
    name: Option<String>,
    rm: bool,
    command: String,
    events: &Events,
) -> Result<Reply> {
    if let Some(n) = &name {
        if !valid_name(n) {
            bail!("invalid container name {n:?}: use letters, digits, '_', '.', '-', starting with a letter or digit");
        }
    }
    super::pull(state, image, platform, false, events).await?;
    let key = image.parse::<lazypull_fetcher::Reference>()?.to_string();
    super::ensure_mounted(state, &key, events).await?;
    let mut st = state.lock().await;
    let id = random_id();
    let name = name.unwrap_or_else(|| id[..12].to_string());
    if st.containers.values().any(|c| c.name == name) {
        bail!("the container name {name:?} is already in use; remove that container (`lazypull rm {name}`) or choose another name");
    }
    let record = st
        .images
        .get(&key)
        .map(|e| e.record.clone())
        .with_context(|| format!("image {key} was removed meanwhile"))?;
    let dirs = st.layer_dirs(&record)?;
    let root = st.settings.root.clone();
    let bundle = container_dir(&root, &id);
    let (rootfs, upper, work) = (
        bundle.join("rootfs"),
        bundle.join("upper"),
        bundle.join("work"),
    );
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if let Err(e) = mounts::mount_writable_stack(&dirs, &upper, &work, &rootfs) {
        let _ = std::fs::remove_dir_all(&bundle);
        return Err(e);
    }
    let c = ContainerRecord {
        id: id.clone(),
        name: name.clone(),
        image: key,
        command,
        created: store::now(),
        rm,
        status: "created".into(),
        exit_code: None,
        supervisor: None,
    };
    save(&root, &c)?;
    st.containers.insert(id.clone(), c);
    Ok(Reply::data(Created {
        id,
        name,
        bundle,
        image_config: record.config,
    }))
}

/// Finds a container by exact name, full ID or unique ID prefix.
fn find(
    containers: &std::collections::BTreeMap<String, ContainerRecord>,
    q: &str,
) -> Result<String> {
    if let Some(c) = containers.values().find(|c| c.name == q) {
        return Ok(c.id.clone());
    }
    let hits: Vec<&String> = containers.keys().filter(|id| id.starts_with(q)).collect();
    match hits.as_slice() {
        [one] if !q.is_empty() => Ok((*one).clone()),
        [] | [_] => bail!("no such container: {q} (see `lazypull ps`)"),
        _ => bail!("{q} matches several containers; give more of the ID"),
    }
}

/// The supervisor started the runtime.
pub async fn started(state: &Shared, id: &str, pid: u32) -> Result<Reply> {
    let mut st = state.lock().await;
    let root = st.settings.root.clone();
    let c = st
        .containers
        .get_mut(id)
        .with_context(|| format!("no such container: {id}"))?;
    c.status = "running".into();
    c.supervisor = Some(pid);
    save(&root, c)?;
    Ok(Reply::ok("started"))
}

/// The container exited with `code`.
pub async fn exited(state: &Shared, id: &str, code: i32) -> Result<Reply> {
    let mut st = state.lock().await;
    let root = st.settings.root.clone();
    let c = st
        .containers
        .get_mut(id)
        .with_context(|| format!("no such container: {id}"))?;
    c.status = "exited".into();
    c.exit_code = Some(code);
    c.supervisor = None;
    save(&root, c)?;
    // Nothing runs on the root any more: unmount it now rather than at `rm`.
    for mp in mounts::mounts_under(&container_dir(&root, id)) {
        mounts::unmount(&mp)?;
    }
    Ok(Reply::ok("exited"))
}

/// The status a container is really in: the runtime's word when it knows the container,
/// else what its supervisor last reported (a supervisor that died mid-run leaves `exited`).
fn status(rt: &Runtime, c: &ContainerRecord) -> String {
    if c.status == "exited" {
        return c.status.clone();
    }
    match rt.state(&c.id) {
        Some(s) if s == "stopped" => "exited".into(),
        Some(s) => s,
        None if c.status == "created" && c.supervisor.is_none() => "created".into(),
        None => "exited".into(),
    }
}

/// Names of running containers.
pub async fn running(state: &Shared) -> Vec<String> {
    let st = state.lock().await;
    let rt = Runtime::new(&st.settings);
    st.containers
        .values()
        .filter(|c| status(&rt, c) == "running")
        .map(|c| c.name.clone())
        .collect()
}

/// `ps`.
pub async fn ps(state: &Shared) -> Result<Reply> {
    let st = state.lock().await;
    let rt = Runtime::new(&st.settings);
    let list: Vec<ContainerInfo> = st
        .containers
        .values()
        .map(|c| ContainerInfo {
            id: c.id.clone(),
            name: c.name.clone(),
            image: c.image.clone(),
            command: c.command.clone(),
            created: c.created,
            status: status(&rt, c),
            exit_code: c.exit_code,
        })
        .collect();
    Ok(Reply::data(list))
}

/// SIGTERM, then SIGKILL after `timeout` seconds; returns once the container stopped.
pub async fn stop(state: &Shared, q: &str, timeout: u64) -> Result<Reply> {
    let (rt, id, name) = {
        let st = state.lock().await;
        let id = find(&st.containers, q)?;
        let name = st.containers[&id].name.clone();
        (Runtime::new(&st.settings), id, name)
    };
    if rt.state(&id).as_deref() != Some("running") {
        return Ok(Reply::ok(format!("{name} is not running")));
    }
    let _ = rt.kill(&id, "TERM");
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let rt2 = rt.clone();
    let id2 = id.clone();
    let stopped = tokio::task::spawn_blocking(move || {
        while Instant::now() < deadline {
            if rt2.state(&id2).as_deref() != Some("running") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })
    .await?;
    if !stopped {
        let _ = rt.kill(&id, "KILL");
        let rt2 = rt.clone();
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && rt2.state(&id2).as_deref() == Some("running") {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await?;
    }
    Ok(Reply::ok(name))
}

/// Removes a container: kills it when `force`, deletes it from the runtime, unmounts its root,
/// deletes its directory and record.
pub async fn remove(state: &Shared, q: &str, force: bool) -> Result<Reply> {
    let (rt, c, root) = {
        let st = state.lock().await;
        let id = find(&st.containers, q)?;
        (
            Runtime::new(&st.settings),
            st.containers[&id].clone(),
            st.settings.root.clone(),
        )
    };
    let s = tokio::task::block_in_place(|| status(&rt, &c));
    if s == "running" && !force {
        bail!(
            "container {} is running: stop it first (`lazypull stop {}`) or use `rm -f`",
            c.name,
            c.name
        );
    }
    let rt2 = rt.clone();
    let id = c.id.clone();
    tokio::task::spawn_blocking(move || {
        if rt2.state(&id).is_some() {
            let _ = rt2.kill(&id, "KILL");
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && rt2.state(&id).as_deref() == Some("running") {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = rt2.delete(&id);
        }
    })
    .await?;
    let dir = container_dir(&root, &c.id);
    for mp in mounts::mounts_under(&dir) {
        mounts::unmount(&mp)?;
    }
    std::fs::remove_dir_all(&dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .with_context(|| format!("removing {}", dir.display()))?;
    state.lock().await.containers.remove(&c.id);
    Ok(Reply::ok(c.name))
}
