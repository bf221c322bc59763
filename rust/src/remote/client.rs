//! The clients and the runtime they run on. One tokio runtime per process (built on first
//! use, a few worker threads: the work is waiting on sockets), and one client per bucket and
//! configuration, kept for the life of the process so connections are reused.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};
use tokio::runtime::Runtime;

use super::{profile, ObjectUri, Scheme};
use crate::error::{Error, Result};

/// Worker threads of the runtime: they only move bytes between sockets and futures.
const WORKER_THREADS: usize = 2;
/// How often a blocked caller looks at its stop flags.
const STOP_POLL: Duration = Duration::from_millis(20);

/// The process's runtime, rebuilt in a forked child (a runtime's threads do not survive a
/// fork; the parent's is leaked there, never used).
pub fn runtime() -> Arc<Runtime> {
    static RT: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);
    let mut g = RT.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some((owner, rt)) = g.as_ref() {
        if *owner == pid {
            return rt.clone();
        }
        std::mem::forget(g.take());
    }
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("fastindex-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the I/O runtime: {e}")),
    );
    *g = Some((pid, rt.clone()));
    rt
}

/// Run `fut` to completion on the runtime, from a thread outside it; `None` as soon as one
/// of `stops` is set (checked every few milliseconds, so a stop is seen while requests are
/// in flight; the requests are dropped).
pub fn block_on<F: Future>(fut: F, stops: &[&AtomicBool]) -> Option<F::Output> {
    let stopped = || stops.iter().any(|s| s.load(Ordering::Relaxed));
    if stopped() {
        return None;
    }
    runtime().block_on(async {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                () = tokio::time::sleep(STOP_POLL) => {
                    if stopped() {
                        return None;
                    }
                }
            }
        }
    })
}

/// How patient a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Patience {
    /// The first request of a call: one retry, short timeouts, so that wrong credentials, a
    /// missing bucket or no network fail at once.
    Quick,
    /// The work itself: retries with backoff on 5xx, throttling and dropped connections.
    Patient,
}

fn retry(p: Patience) -> RetryConfig {
    match p {
        Patience::Quick => RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(500),
                base: 2.0,
            },
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
        },
        Patience::Patient => RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            // `FASTINDEX_OBJECT_RETRIES` (0..=100) changes it: tests set 0 to see how a phase
            // ends and resumes when the retries give up.
            max_retries: std::env::var("FASTINDEX_OBJECT_RETRIES")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .map_or(10, |n| n.min(100)),
            retry_timeout: Duration::from_secs(120),
        },
    }
}

/// The environment a client is built from: a change (a test pointing at another endpoint,
/// new credentials) gives a new client.
fn env_fingerprint() -> u64 {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("AWS_")
                || k.starts_with("GOOGLE_")
                || k.starts_with("AZURE_")
                || k == "FASTINDEX_OBJECT_RETRIES"
        })
        .collect();
    vars.sort();
    let mut h = DefaultHasher::new();
    vars.hash(&mut h);
    std::env::var_os("HOME").hash(&mut h);
    h.finish()
}

type Key = (u32, Scheme, String, Patience, u64);

/// The client for `uri`'s bucket.
pub fn client(uri: &ObjectUri, patience: Patience) -> Result<Arc<dyn ObjectStore>> {
    static CLIENTS: Mutex<Option<HashMap<Key, Arc<dyn ObjectStore>>>> = Mutex::new(None);
    let key: Key = (
        std::process::id(),
        uri.scheme,
        uri.bucket.clone(),
        patience,
        env_fingerprint(),
    );
    let mut g = CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    let map = g.get_or_insert_with(HashMap::new);
    if let Some(c) = map.get(&key) {
        return Ok(c.clone());
    }
    let c = build(uri, patience)?;
    map.insert(key, c.clone());
    Ok(c)
}

fn bad_config(uri: &ObjectUri, e: impl std::fmt::Display) -> Error {
    Error::ObjectStore {
        uri: uri.bucket_uri(),
        reason: format!("cannot configure the client: {e}"),
    }
}

fn build(uri: &ObjectUri, patience: Patience) -> Result<Arc<dyn ObjectStore>> {
    let connect = ("connect_timeout", "5s");
    let timeout = (
        "timeout",
        if patience == Patience::Quick {
            "10s"
        } else {
            "60s"
        },
    );
    let client_key = |k: &str| k.parse::<ClientConfigKey>();
    let store: Arc<dyn ObjectStore> = match uri.scheme {
        Scheme::S3 => {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&uri.bucket)
                .with_retry(retry(patience));
            for (k, v) in [connect, timeout] {
                let k = client_key(k).map_err(|e| bad_config(uri, e))?;
                b = b.with_config(AmazonS3ConfigKey::Client(k), v);
            }
            b = with_profile(b, uri)?;
            Arc::new(b.build().map_err(|e| bad_config(uri, e))?)
        }
        Scheme::Gs => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&uri.bucket)
                .with_retry(retry(patience));
            for (k, v) in [connect, timeout] {
                let k = client_key(k).map_err(|e| bad_config(uri, e))?;
                b = b.with_config(GoogleConfigKey::Client(k), v);
            }
            Arc::new(b.build().map_err(|e| bad_config(uri, e))?)
        }
        Scheme::Az => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(&uri.bucket)
                .with_retry(retry(patience));
            for (k, v) in [connect, timeout] {
                let k = client_key(k).map_err(|e| bad_config(uri, e))?;
                b = b.with_config(AzureConfigKey::Client(k), v);
            }
            Arc::new(b.build().map_err(|e| bad_config(uri, e))?)
        }
    };
    Ok(store)
}

/// Keys, region and endpoint from `~/.aws` where the environment does not give them (the
/// environment wins, as for the AWS tools).
fn with_profile(mut b: AmazonS3Builder, uri: &ObjectUri) -> Result<AmazonS3Builder> {
    let has = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let keys_in_env = has("AWS_ACCESS_KEY_ID");
    // Web identity (EKS) and container credentials are found by object_store itself.
    let other_source = has("AWS_WEB_IDENTITY_TOKEN_FILE")
        || has("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || has("AWS_CONTAINER_CREDENTIALS_FULL_URI");
    let region_in_env = has("AWS_REGION") || has("AWS_DEFAULT_REGION");
    let endpoint_in_env = has("AWS_ENDPOINT_URL") || has("AWS_ENDPOINT");
    if keys_in_env && region_in_env && endpoint_in_env {
        return Ok(b);
    }
    let p = match profile::load() {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(b),
        Err(e) => return Err(bad_config(uri, e)),
    };
    if !keys_in_env && !other_source {
        if let (Some(k), Some(s)) = (&p.access_key_id, &p.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
            if let Some(t) = &p.session_token {
                b = b.with_token(t);
            }
        }
    }
    if !region_in_env {
        if let Some(r) = &p.region {
            b = b.with_region(r);
        }
    }
    if !endpoint_in_env {
        if let Some(e) = &p.endpoint_url {
            b = b.with_endpoint(e);
            if e.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
    }
    Ok(b)
}

/// Requests kept in flight by phase 2 and `read_objects`: `FASTINDEX_OBJECT_REQUESTS` when
/// set (1..=1024), else `default`.
pub fn in_flight(default: usize) -> usize {
    std::env::var("FASTINDEX_OBJECT_REQUESTS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(default, |n| n.clamp(1, 1024))
}
