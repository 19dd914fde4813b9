//! Globs over remote files: `hf://datasets/OWNER/NAME@REV/PATH/*.parquet` through the Hub's
//! tree API, `s3://bucket/prefix/**/*.jsonl` through object_store's `list`.
//!
//! A pattern expands when the pipeline is loaded, sorted, into one [`FileRef`] per match;
//! each carries the version the store reports (the Hub's LFS sha256 or git oid, S3's e-tag,
//! and the size), which enters the key: a shard replaced under the same name reruns what
//! reads it, as a local file's new contents would. Listings are untrusted input: entries
//! outside the listed directory or with `..` are refused, the Hub's pagination may not lead to
//! another host (the token would follow it), and the number of pages is bounded.
//!
//! The same matching rules as local globs (the `glob` crate): `*` and `?` stay within a
//! path segment, `**` spans directories, `[abc]` is a class.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;

use crate::key::FileRef;

/// Stops a listing that never ends (a broken or hostile server).
const MAX_PAGES: usize = 10_000;

/// True when a Files entry is a pattern rather than one file.
pub fn is_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// Lists the files a remote pattern matches, sorted by URL; no match is an error.
pub fn expand(url: &str) -> Result<Vec<FileRef>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the listing runtime: {e}"))?;
    let mut found = if url.starts_with("hf://") {
        runtime.block_on(hub(url))?
    } else if url.starts_with("s3://") {
        runtime.block_on(s3(url))?
    } else {
        return Err(format!(
            "`{url}`: globs work for local paths, hf:// and s3:// URLs (an http(s) server cannot be listed: name its files)"
        ));
    };
    if found.is_empty() {
        return Err(format!("no file matches `{url}`"));
    }
    found.sort_by(|a, b| a.shown.cmp(&b.shown));
    found.dedup_by(|a, b| a.shown == b.shown);
    Ok(found)
}

/// (the literal directory before the first wildcard, ending in `/` or empty; the matcher).
fn split(path: &str) -> Result<(&str, glob::Pattern), String> {
    let first = path.find(['*', '?', '[']).unwrap_or(path.len());
    let cut = path[..first].rfind('/').map_or(0, |i| i + 1);
    let pattern = glob::Pattern::new(path).map_err(|e| format!("invalid glob `{path}`: {e}"))?;
    Ok((&path[..cut], pattern))
}

fn matches(pattern: &glob::Pattern, path: &str) -> bool {
    pattern.matches_with(
        path,
        glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        },
    )
}

/// A listed path must lie under the listed directory and be a plain relative path.
fn plausible(path: &str, dir: &str) -> bool {
    path.starts_with(dir)
        && !path.starts_with('/')
        && !path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

#[derive(serde::Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    oid: String,
}

/// The Hub's `GET /api/{datasets/|models/}OWNER/NAME/tree/REV/DIR?recursive=...`, following
/// its `Link: <...>; rel="next"` pages.
async fn hub(url: &str) -> Result<Vec<FileRef>, String> {
    let u = flow_stages::data::remote::HubUrl::parse(url).map_err(|e| e.to_string())?;
    let (dir, pattern) = split(u.path)?;
    let endpoint = flow_stages::data::remote::hub_endpoint();
    let base = url::Url::parse(&endpoint).map_err(|e| format!("HF_ENDPOINT `{endpoint}`: {e}"))?;
    let host = base.host_str().unwrap_or("").to_string();
    let recursive = u.path[dir.len()..].contains('/');
    let api = match u.prefix {
        "datasets/" => "datasets",
        _ => "models",
    };
    let tree_dir = dir.trim_end_matches('/');
    let mut next = Some(format!(
        "{}/api/{api}/{}/{}/tree/{}{}{tree_dir}?recursive={recursive}&expand=false",
        endpoint.trim_end_matches('/'),
        u.owner,
        u.name,
        u.revision,
        if tree_dir.is_empty() { "" } else { "/" },
    ));
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(auth) =
        flow_stages::data::remote::hub_auth_header(&host).map_err(|e| e.to_string())?
    {
        headers.insert(reqwest::header::AUTHORIZATION, auth);
    }
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("listing `{url}`: {e}"))?;
    // Everything before the path as the user wrote it, so matches keep the same spelling.
    let stem = &url[..url.len() - u.path.len()];
    let mut found = Vec::new();
    let mut pages = 0;
    while let Some(page) = next.take() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(format!("listing `{url}`: more than {MAX_PAGES} pages"));
        }
        let response = client.get(&page).send().await.map_err(|e| {
            format!(
                "listing `{url}`: {e} (a glob is listed when the pipeline loads: without the Hub, point `files` at a local copy)"
            )
        })?;
        let status = response.status();
        if !status.is_success() {
            let hint = if status.as_u16() == 401 || status.as_u16() == 403 {
                " (a gated or private repository needs HF_TOKEN)"
            } else {
                ""
            };
            return Err(format!("listing `{url}`: the Hub answered {status}{hint}"));
        }
        next = next_link(response.headers(), &host).map_err(|e| format!("listing `{url}`: {e}"))?;
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("listing `{url}`: {e}"))?;
        let entries: Vec<TreeEntry> = serde_json::from_slice(&body)
            .map_err(|e| format!("listing `{url}`: not a tree listing: {e}"))?;
        for e in entries {
            if e.kind != "file" || !matches(&pattern, &e.path) {
                continue;
            }
            if !plausible(&e.path, dir) {
                return Err(format!(
                    "listing `{url}`: the Hub listed `{}`, outside `{dir}`",
                    e.path
                ));
            }
            let oid = e.lfs.map(|l| l.oid).or(e.oid).unwrap_or_default();
            let size = e.size.map(|s| s.to_string()).unwrap_or_default();
            found.push(FileRef {
                shown: format!("{stem}{}", e.path),
                local: None,
                version: Some(format!("oid={oid},size={size}")),
            });
        }
    }
    Ok(found)
}

/// The `rel="next"` URL of a `Link` header, which must stay on the Hub's host.
fn next_link(headers: &reqwest::header::HeaderMap, host: &str) -> Result<Option<String>, String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(text) = value.to_str() else { continue };
        for part in text.split(',') {
            let mut pieces = part.split(';');
            let target = pieces.next().unwrap_or("").trim();
            if !pieces.any(|p| p.trim().replace(' ', "") == "rel=\"next\"") {
                continue;
            }
            let target = target.trim_start_matches('<').trim_end_matches('>');
            let parsed =
                url::Url::parse(target).map_err(|e| format!("bad next page `{target}`: {e}"))?;
            if parsed.host_str() != Some(host) {
                return Err(format!("the next page `{target}` is on another host"));
            }
            return Ok(Some(target.to_string()));
        }
    }
    Ok(None)
}

/// S3 (and compatible servers): one `list` under the literal prefix, settings from the
/// standard `AWS_*` variables as for the stage that downloads the files.
async fn s3(url: &str) -> Result<Vec<FileRef>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
    let bucket = parsed.host_str().unwrap_or("").to_string();
    if bucket.is_empty() {
        return Err(format!("`{url}`: no bucket"));
    }
    // The key as written (url::Url would percent-encode a `[` class).
    let key = url
        .strip_prefix("s3://")
        .and_then(|r| r.split_once('/'))
        .map(|(_, k)| k)
        .unwrap_or("");
    let (dir, pattern) = split(key)?;
    let store: Arc<dyn ObjectStore> = Arc::new(
        object_store::aws::AmazonS3Builder::from_env()
            .with_url(format!("s3://{bucket}"))
            .build()
            .map_err(|e| format!("listing `{url}`: {e}"))?,
    );
    let prefix = StorePath::from(dir.trim_end_matches('/'));
    let listed: Vec<object_store::ObjectMeta> = store
        .list((!dir.is_empty()).then_some(&prefix))
        .try_collect()
        .await
        .map_err(|e| format!("listing `{url}`: {e}"))?;
    let mut found = Vec::new();
    for meta in listed {
        let path = meta.location.as_ref();
        if !matches(&pattern, path) {
            continue;
        }
        if !plausible(path, dir) {
            return Err(format!(
                "listing `{url}`: the store listed `{path}`, outside `{dir}`"
            ));
        }
        found.push(FileRef {
            shown: format!("s3://{bucket}/{path}"),
            local: None,
            version: Some(format!(
                "etag={},size={}",
                meta.e_tag.as_deref().unwrap_or(""),
                meta.size
            )),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_literal_directory_ends_before_the_first_wildcard() {
        assert_eq!(
            split("default/train/*.parquet").unwrap().0,
            "default/train/"
        );
        assert_eq!(split("*.jsonl").unwrap().0, "");
        assert_eq!(split("a/**/b?.jsonl").unwrap().0, "a/");
    }

    #[test]
    fn stars_stay_in_a_segment_and_double_stars_span_them() {
        let (_, p) = split("data/*.jsonl").unwrap();
        assert!(matches(&p, "data/a.jsonl"));
        assert!(!matches(&p, "data/sub/a.jsonl"));
        let (_, p) = split("data/**/*.jsonl").unwrap();
        assert!(matches(&p, "data/sub/deeper/a.jsonl"));
        assert!(matches(&p, "data/a.jsonl"));
        assert!(!matches(&p, "other/a.jsonl"));
    }

    #[test]
    fn listed_paths_must_stay_under_the_directory() {
        assert!(plausible("data/a.jsonl", "data/"));
        assert!(!plausible("data/../secret", "data/"));
        assert!(!plausible("/etc/passwd", ""));
        assert!(!plausible("other/a", "data/"));
        assert!(!plausible("data//a", "data/"));
    }

    #[test]
    fn the_next_page_must_stay_on_the_hub() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            "<https://huggingface.co/api/x?cursor=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h, "huggingface.co").unwrap().as_deref(),
            Some("https://huggingface.co/api/x?cursor=2")
        );
        assert!(next_link(&h, "127.0.0.1").is_err());
        assert_eq!(
            next_link(&reqwest::header::HeaderMap::new(), "h").unwrap(),
            None
        );
    }
}
