//! A TCP proxy on loopback that a test can cut and restore, to take a backend
//! (Postgres) away from the cluster and give it back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct CutProxy {
    /// Address clients connect to.
    pub address: SocketAddr,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Option<JoinSet<()>>>>,
}

impl CutProxy {
    /// Starts forwarding a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let proxy = Self {
            address,
            upstream,
            tasks: Arc::new(Mutex::new(None)),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let upstream = self.upstream;
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accepted = connections.clone();
        tasks.spawn(async move {
            // The accept loop owns the connection tasks: aborting it drops them.
            let _connections = accepted;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let mut set = _connections.lock().unwrap();
                set.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        drop(connections);
        *self.tasks.lock().unwrap() = Some(tasks);
    }

    /// Closes the listener and every open connection.
    pub fn cut(&self) {
        if let Some(mut tasks) = self.tasks.lock().unwrap().take() {
            tasks.abort_all();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}
