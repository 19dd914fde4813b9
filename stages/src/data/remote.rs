//! Remote inputs through object_store: `s3://bucket/key` (settings from the standard `AWS_*`
//! variables, `AWS_ENDPOINT_URL` for S3-compatible servers), `http(s)://...`, and
//! `hf://datasets/OWNER/NAME[@REVISION]/PATH` (or `hf://OWNER/NAME/...` for model repos),
//! mapped to the Hub's resolve URL (`HF_ENDPOINT` overrides the host) with `HF_TOKEN` as a
//! bearer token when set.
//!
//! A remote file is streamed to disk chunk by chunk (never held in memory) into the stage's
//! scratch directory, so an interrupted download is not repeated once complete, and is then
//! read like a local file.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt};

use crate::kind::StageError;

/// The parts of an `hf://` URL: `hf://datasets/OWNER/NAME[@REVISION]/PATH` (a dataset) or
/// `hf://OWNER/NAME[@REVISION]/PATH` (a model repository).
#[derive(Debug, Clone, PartialEq)]
pub struct HubUrl<'a> {
    /// `"datasets/"` or `""` (models), as the Hub prefixes its URLs.
    pub prefix: &'static str,
    pub owner: &'a str,
    pub name: &'a str,
    /// `main` when not given; kept as written (URL-encoded, as `refs%2Fconvert%2Fparquet`).
    pub revision: &'a str,
    pub path: &'a str,
}

impl<'a> HubUrl<'a> {
    /// Splits an `hf://` URL; one without owner, name and path is a parameter error.
    pub fn parse(url: &'a str) -> Result<HubUrl<'a>, StageError> {
        let rest = url
            .strip_prefix("hf://")
            .ok_or_else(|| StageError::Params(format!("not an hf:// URL: {url}")))?;
        let (prefix, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => ("datasets/", r),
            None => ("", rest),
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(StageError::Params(format!(
                "{url}: expected hf://datasets/OWNER/NAME[@REVISION]/PATH"
            )));
        };
        if owner.is_empty() || name.is_empty() || path.is_empty() {
            return Err(StageError::Params(format!(
                "{url}: expected hf://datasets/OWNER/NAME[@REVISION]/PATH"
            )));
        }
        let (name, revision) = name.split_once('@').unwrap_or((name, "main"));
        Ok(HubUrl {
            prefix,
            owner,
            name,
            revision,
            path,
        })
    }
}

/// The Hub's base URL: `HF_ENDPOINT`, else huggingface.co.
pub fn hub_endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

/// The http(s) URL a `hf://` URL stands for.
pub fn hf_to_https(url: &str, endpoint: &str) -> Result<String, StageError> {
    let u = HubUrl::parse(url)?;
    Ok(format!(
        "{}/{}{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        u.prefix,
        u.owner,
        u.name,
        u.revision,
        u.path
    ))
}

/// `Authorization: Bearer $HF_TOKEN` when `host` is the Hub's (the token goes nowhere else).
pub fn hub_auth_header(host: &str) -> Result<Option<http::HeaderValue>, StageError> {
    if !is_hub(host) {
        return Ok(None);
    }
    let Ok(token) = std::env::var("HF_TOKEN") else {
        return Ok(None);
    };
    let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| StageError::Params("HF_TOKEN is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

fn fail(url: &str) -> impl Fn(object_store::Error) -> StageError + '_ {
    move |e| StageError::Failed(format!("fetching {url}: {e}"))
}

/// Opens the store and the object path for a URL.
fn open(url: &str) -> Result<(Box<dyn ObjectStore>, StorePath), StageError> {
    let parsed = url::Url::parse(url).map_err(|e| StageError::Params(format!("{url}: {e}")))?;
    match parsed.scheme() {
        "s3" => {
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(fail(url))?;
            let path = StorePath::parse(parsed.path().trim_start_matches('/'))
                .map_err(|e| StageError::Params(format!("{url}: {e}")))?;
            Ok((Box::new(store), path))
        }
        "http" | "https" => {
            let base = &parsed[..url::Position::BeforePath];
            let mut options = ClientOptions::new().with_allow_http(parsed.scheme() == "http");
            if let Some(value) = hub_auth_header(parsed.host_str().unwrap_or(""))? {
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, value);
                options = options.with_default_headers(headers);
            }
            let store = object_store::http::HttpBuilder::new()
                .with_url(base)
                .with_client_options(options)
                .build()
                .map_err(fail(url))?;
            let path = StorePath::parse(parsed.path().trim_start_matches('/'))
                .map_err(|e| StageError::Params(format!("{url}: {e}")))?;
            Ok((Box::new(store), path))
        }
        other => Err(StageError::Params(format!(
            "{url}: `{other}://` is not supported for inputs (use s3://, http(s):// or hf://)"
        ))),
    }
}

/// The host of the Hub (or of `HF_ENDPOINT`), which alone receives `HF_TOKEN`.
fn is_hub(host: &str) -> bool {
    url::Url::parse(&hub_endpoint())
        .ok()
        .and_then(|u| u.host_str().map(|h| h == host))
        .unwrap_or(false)
}

/// Downloads `url` into `dir` (once; a completed download is reused) and returns the local
/// path, whose name keeps the URL's file name so its type can be recognized.
pub fn fetch(url: &str, dir: &Path) -> Result<PathBuf, StageError> {
    let resolved = if url.starts_with("hf://") {
        hf_to_https(url, &hub_endpoint())?
    } else {
        url.to_string()
    };
    let name = resolved.rsplit('/').next().unwrap_or("download");
    let id = blake3::hash(url.as_bytes()).to_hex();
    let dest = dir.join(format!("{}-{name}", &id[..16]));
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
    let part = dest.with_extension("part");
    let (store, path) = open(&resolved)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StageError::io("starting the download runtime", e))?;
    runtime.block_on(async {
        let get = store.get(&path).await.map_err(fail(url))?;
        let expected = get.meta.size;
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&part)
                .map_err(|e| StageError::io(format!("creating {}", part.display()), e))?,
        );
        let mut stream = get.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(fail(url))?;
            written += chunk.len() as u64;
            file.write_all(&chunk)
                .map_err(|e| StageError::io(format!("writing {}", part.display()), e))?;
        }
        file.flush()
            .map_err(|e| StageError::io(format!("writing {}", part.display()), e))?;
        if written != expected {
            return Err(StageError::Failed(format!(
                "fetching {url}: got {written} bytes, expected {expected}"
            )));
        }
        Ok(())
    })?;
    std::fs::rename(&part, &dest)
        .map_err(|e| StageError::io(format!("renaming {}", part.display()), e))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::hf_to_https;

    #[test]
    fn hub_urls_map_to_resolve_urls() {
        assert_eq!(
            hf_to_https(
                "hf://datasets/openai/gsm8k/main/test-00000-of-00001.parquet",
                "https://huggingface.co"
            )
            .unwrap(),
            "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
        );
        assert_eq!(
            hf_to_https("hf://datasets/o/n@v1.0/data/x.jsonl", "http://127.0.0.1:9/").unwrap(),
            "http://127.0.0.1:9/datasets/o/n/resolve/v1.0/data/x.jsonl"
        );
        assert_eq!(
            hf_to_https(
                "hf://meta-llama/Llama-2-7b-hf/tokenizer.json",
                "https://huggingface.co"
            )
            .unwrap(),
            "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/tokenizer.json"
        );
        assert!(hf_to_https("hf://datasets/only-owner", "https://h").is_err());
    }
}
