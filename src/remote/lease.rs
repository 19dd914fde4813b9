//! Leases: which machine computes a key, so two machines sharing a remote do not both run
//! it. Object stores have no locks and no compare-and-swap that works everywhere
//! (`LocalFileSystem` refuses `PutMode::Update`), but all of them have create-only puts
//! (`PutMode::Create`: S3's `If-None-Match: *`, a hard link on a file system). A lease is
//! therefore a sequence of generations, `leases/<key>/<generation>.json`, each one created
//! create-only and never overwritten:
//!
//! - taking an expired (or released) lease at generation `g` creates `g + 1`; of any number
//!   of machines racing for it, exactly one create succeeds;
//! - renewing creates the next generation too, so a holder whose lease expired and was
//!   taken over learns it at its next renewal, instead of overwriting the new holder's;
//! - releasing creates a tombstone generation (expired at once);
//! - the creator of a generation deletes the older ones, and then checks that no newer
//!   generation exists: a machine that listed long ago and created a generation that was
//!   deleted meanwhile sees the newer one and backs off.
//!
//! Only the newest generation counts. Expiry compares wall clocks, so machines sharing a
//! remote need clocks closer than the lease time (`FLOW_LEASE_SECONDS`, 60 s by default).

use serde::{Deserialize, Serialize};

use super::{Remote, RemoteError, Result, now};

/// What a lease generation says.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    /// Unix seconds; 0 for a released lease.
    expires: u64,
}

/// The outcome of [`Remote::try_lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAttempt {
    /// This caller holds the lease, at this generation (renew and release name it).
    Taken(u64),
    /// Another live holder has it (its description).
    HeldBy(String),
}

fn lease_prefix(key: &str) -> String {
    format!("leases/{key}")
}

fn lease_rel(key: &str, generation: u64) -> String {
    format!("leases/{key}/{generation:020}.json")
}

impl Remote {
    /// The generations of a key's lease that exist, oldest first.
    fn lease_generations(&self, key: &str) -> Result<Vec<u64>> {
        let mut generations: Vec<u64> = self
            .list(&lease_prefix(key))?
            .into_iter()
            .filter_map(|(rel, _)| rel.strip_suffix(".json")?.parse().ok())
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    /// The newest generation of a key's lease and what it says (None when unreadable, which
    /// counts as expired: a planted or torn object must not block a key forever). None when
    /// the key was never leased.
    fn newest_lease(&self, key: &str) -> Result<Option<(u64, Option<LeaseBody>)>> {
        for _ in 0..8 {
            let Some(&newest) = self.lease_generations(key)?.last() else {
                return Ok(None);
            };
            // Gone between the listing and the read: superseded; list again.
            if let Some(bytes) = self.get_bytes(&lease_rel(key, newest))? {
                return Ok(Some((newest, serde_json::from_slice(&bytes).ok())));
            }
        }
        Err(RemoteError::Store {
            url: self.url.clone(),
            message: format!("the lease on {key} changed on every read (contended)"),
        })
    }

    /// Creates a generation create-only; then deletes the older ones and checks that no
    /// newer one exists. True when the caller now holds `generation`.
    fn claim_generation(&self, key: &str, generation: u64, body: &LeaseBody) -> Result<bool> {
        let bytes = serde_json::to_vec(body).expect("lease bodies serialize");
        if !self.put_small(&lease_rel(key, generation), bytes)? {
            return Ok(false);
        }
        let generations = self.lease_generations(key)?;
        for &old in generations.iter().filter(|&&g| g < generation) {
            self.delete(&lease_rel(key, old))?;
        }
        Ok(generations.iter().all(|&g| g <= generation))
    }

    /// Tries to take the lease on a key for `ttl` seconds: taken when nobody holds it or its
    /// holder let it expire; otherwise who holds it. Of machines racing, exactly one wins.
    pub fn try_lease(&self, key: &str, holder: &str, ttl: u64) -> Result<LeaseAttempt> {
        let next = match self.newest_lease(key)? {
            None => 0,
            Some((_, Some(body))) if body.expires > now() => {
                return Ok(LeaseAttempt::HeldBy(body.holder));
            }
            Some((generation, _)) => generation + 1,
        };
        let body = LeaseBody {
            holder: holder.to_string(),
            expires: now() + ttl,
        };
        if self.claim_generation(key, next, &body)? {
            return Ok(LeaseAttempt::Taken(next));
        }
        Ok(LeaseAttempt::HeldBy(match self.newest_lease(key)? {
            Some((_, Some(body))) => body.holder,
            _ => "another process (lease contended)".into(),
        }))
    }

    /// Who holds a key's lease, if anyone does and it has not expired.
    pub fn lease_holder(&self, key: &str) -> Result<Option<String>> {
        Ok(match self.newest_lease(key)? {
            Some((_, Some(body))) if body.expires > now() => Some(body.holder),
            _ => None,
        })
    }

    /// Extends a lease held at `generation` for `ttl` more seconds; returns the new
    /// generation. An error when it was taken over meanwhile (it had expired): the caller
    /// no longer holds it.
    pub fn renew_lease(&self, key: &str, holder: &str, generation: u64, ttl: u64) -> Result<u64> {
        let body = LeaseBody {
            holder: holder.to_string(),
            expires: now() + ttl,
        };
        if self.claim_generation(key, generation + 1, &body)? {
            return Ok(generation + 1);
        }
        Err(RemoteError::LeaseLost {
            url: self.url.clone(),
            key: key.to_string(),
            holder: self
                .lease_holder(key)?
                .unwrap_or_else(|| "another process".into()),
        })
    }

    /// Gives up a lease held at `generation` (a tombstone generation, expired at once).
    pub fn release_lease(&self, key: &str, holder: &str, generation: u64) -> Result<()> {
        let body = LeaseBody {
            holder: holder.to_string(),
            expires: 0,
        };
        // Taken over meanwhile (false): then it is not ours to release.
        self.claim_generation(key, generation + 1, &body)?;
        Ok(())
    }
}
