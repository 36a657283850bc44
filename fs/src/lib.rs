//! lazypull-fs: image layer formats and the lazy FUSE filesystem (built in the lazy layer filesystem issue).
