//! A hyper HTTP/1.1 server on its own thread and tokio runtime, so it keeps serving while test
//! code blocks, and can be dropped from inside or outside an async context.

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response body type of the background servers.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A complete in-memory body.
pub(crate) fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A server that stops (and closes every connection) when dropped.
pub(crate) struct BackgroundServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundServer {
    /// Binds 127.0.0.1 on a free port and serves `handler` on a dedicated thread.
    pub(crate) fn start<F, Fut>(name: &'static str, handler: F) -> BackgroundServer
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a test server");
        listener
            .set_nonblocking(true)
            .expect("set test server listener non-blocking");
        let addr = listener.local_addr().expect("local_addr of test server");
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let handler = Arc::new(handler);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(format!("{name}-worker"))
                    .enable_all()
                    .build()
                    .expect("build tokio runtime for test server");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register test server listener with tokio");
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let _ = stream.set_nodelay(true);
                                let handler = handler.clone();
                                tokio::spawn(async move {
                                    let service = service_fn(move |req| {
                                        let handler = handler.clone();
                                        async move { Ok::<_, Infallible>(handler(req).await) }
                                    });
                                    // Errors here are client disconnects or deliberate aborts.
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime here cancels every connection task.
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .expect("spawn test server thread");
        BackgroundServer {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The bound address (127.0.0.1:port).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
