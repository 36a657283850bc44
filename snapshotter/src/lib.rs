//! lazypull-snapshotter: containerd proxy snapshotter and podman layer store (built in a later issue).
