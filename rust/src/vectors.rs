//! Phase 3's side of the store: claiming `indexed` rows, writing embeddings, reading them back.
//! Vectors are stored as little-endian float16, one BLOB per (model, sample).

use std::collections::HashMap;
use std::path::PathBuf;

use rusqlite::{params, OptionalExtension};

use crate::db::{bump_moves, tally, Store, EMBEDDING, FAILED, INDEXED, READY};
use crate::error::{Error, Result, StoreContext};
use crate::leases::{hold_lease, not_held_by_another, release_all_claims, EMBED_PHASE};
use crate::throughput;

/// Phase 3's claim. `status = 'indexed'` is literal, so that SQLite walks the partial index of
/// `indexed` rows (`samples_indexed`): a claim, and a final sweep from id 0, cost O(rows
/// claimed) at any dataset size.
pub(crate) const CLAIM: &str = "UPDATE samples SET status = 'embedding'
     WHERE id IN (SELECT id FROM samples WHERE dataset_id = ?1 AND id > ?3 AND status = 'indexed'
                  ORDER BY id LIMIT ?2)
     RETURNING id, job_id, root_id, path";

/// The rows after a cursor, driven by the rowid range (`+` keeps SQLite off the
/// `(model_id, sample_id)` index, which would visit every row of the model): O(rows after).
/// Parameters: model, dataset, cursor.
const AFTER_CURSOR: &str = "FROM embeddings e CROSS JOIN samples s ON s.id = e.sample_id
     WHERE e.id > ?3 AND +e.model_id = ?1 AND s.dataset_id = ?2";

impl Store {
    /// The id of a model, registered on first use. A second model's embeddings live beside
    /// the first's.
    pub fn register_model(&mut self, name: &str, pretrained: &str, dim: i64) -> Result<i64> {
        if dim <= 0 {
            return Err(Error::InvalidArgument(format!(
                "model {name}: dimension {dim} must be positive"
            )));
        }
        let id: i64 = self
            .conn
            .query_row(
                "INSERT INTO models (name, pretrained, dim) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name, pretrained) DO UPDATE SET dim = dim RETURNING id, dim",
                params![name, pretrained, dim],
                |r| r.get(0),
            )
            .store(&self.path)?;
        Ok(id)
    }

    /// `(id, name, pretrained, dim)` of every registered model.
    pub fn models(&self) -> Result<Vec<(i64, String, String, i64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, name, pretrained, dim FROM models ORDER BY id")
            .store(&self.path)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .store(&self.path)?;
        rows.collect::<std::result::Result<_, _>>()
            .store(&self.path)
    }

    /// Set the model whose embeddings the dataset's `ready` status means (a JSON spec chosen
    /// by the caller), or `None` to stop wanting embeddings. With a model id, samples that are
    /// `ready` without an embedding of that model go back to `indexed`, so progress tells the
    /// truth about the work the new model still owes.
    pub fn set_embed_spec(
        &mut self,
        dataset_id: i64,
        spec: Option<&str>,
        model_id: Option<i64>,
    ) -> Result<()> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        tx.execute(
            "UPDATE datasets SET embed_spec = ?2 WHERE id = ?1",
            params![dataset_id, spec],
        )
        .store(&path)?;
        if let Some(model) = model_id {
            let mut moves: HashMap<i64, i64> = HashMap::new();
            {
                let mut st = tx
                    .prepare_cached(
                        "UPDATE samples SET status = 'indexed'
                         WHERE dataset_id = ?1 AND status = 'ready'
                           AND id NOT IN (SELECT sample_id FROM embeddings WHERE model_id = ?2)
                         RETURNING job_id",
                    )
                    .store(&path)?;
                tally(
                    &mut st.query(params![dataset_id, model]).store(&path)?,
                    &mut moves,
                )
                .store(&path)?;
            }
            bump_moves(&tx, dataset_id, READY, INDEXED, &moves).store(&path)?;
        }
        tx.commit().store(&path)
    }

    /// Move up to `limit` `indexed` rows with id above `after` to `embedding` and return
    /// `(id, absolute path)` in id order. Callers keep the last id as a cursor; a final sweep
    /// (pass 0) finds rows put back behind it. Either costs O(rows claimed), see [`CLAIM`].
    ///
    /// With `owner`, the claim is made only while no other owner holds the dataset's `embed`
    /// lease (checked, and renewed or taken if free, in the same transaction), else
    /// `LeaseLost` and nothing changes.
    pub fn claim_for_embedding(
        &mut self,
        dataset_id: i64,
        limit: usize,
        after: i64,
        owner: Option<&str>,
    ) -> Result<Vec<(i64, PathBuf)>> {
        let roots = self.root_dirs(dataset_id)?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        if let Some(owner) = owner {
            hold_lease(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        }
        let mut out = Vec::new();
        let mut moves: HashMap<i64, i64> = HashMap::new();
        {
            let mut st = tx.prepare_cached(CLAIM).store(&path)?;
            let mut rows = st
                .query(params![dataset_id, limit as i64, after])
                .store(&path)?;
            while let Some(r) = rows.next().store(&path)? {
                let (id, job, root, rel): (i64, i64, i64, crate::paths::StoredPath) = (
                    r.get(0).store(&path)?,
                    r.get(1).store(&path)?,
                    r.get(2).store(&path)?,
                    r.get(3).store(&path)?,
                );
                *moves.entry(job).or_default() += 1;
                out.push((
                    id,
                    roots
                        .get(&root)
                        .map_or_else(PathBuf::new, PathBuf::clone)
                        .join(rel.0),
                ));
            }
        }
        if !moves.is_empty() {
            // Before the counters move: they still say what was in flight before this claim.
            throughput::begin_claim(&tx, dataset_id, throughput::EMBED).store(&path)?;
        }
        bump_moves(&tx, dataset_id, INDEXED, EMBEDDING, &moves).store(&path)?;
        tx.commit().store(&path)?;
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Store a batch: `vectors` holds `ids.len() * dim` float16 values (little-endian); each
    /// row goes `embedding` -> `ready`. `failed` rows go to `failed` with their reason.
    ///
    /// With `owner`, the batch is written only while no other owner holds the dataset's
    /// `embed` lease (checked, and renewed or taken if free, in the same transaction), else
    /// `LeaseLost` and nothing is written: the rows were given back when another process took
    /// the lease over.
    pub fn finish_embeddings(
        &mut self,
        dataset_id: i64,
        model_id: i64,
        ids: &[i64],
        vectors: &[u8],
        failed: &[(i64, String)],
        owner: Option<&str>,
    ) -> Result<()> {
        let row_bytes = self.vector_bytes(model_id, ids.len(), vectors.len())?;
        let path = self.path.clone();
        let tx = self.immediate()?;
        if let Some(owner) = owner {
            hold_lease(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        }
        let mut ready: HashMap<i64, i64> = HashMap::new();
        let mut bad: HashMap<i64, i64> = HashMap::new();
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO embeddings (model_id, sample_id, vector) VALUES (?1, ?2, ?3)
                     ON CONFLICT (model_id, sample_id) DO UPDATE SET vector = excluded.vector",
                )
                .store(&path)?;
            let mut done = tx
                .prepare_cached("UPDATE samples SET status = 'ready' WHERE id = ?1 AND status = 'embedding' RETURNING job_id")
                .store(&path)?;
            // A row that left `embedding` meanwhile (a sync found its file changed and put it
            // back to `pending`) gets no vector: it would be the old file's.
            for (id, v) in ids.iter().zip(vectors.chunks_exact(row_bytes)) {
                let job: Option<i64> =
                    done.query_row([id], |r| r.get(0)).optional().store(&path)?;
                if let Some(job) = job {
                    *ready.entry(job).or_default() += 1;
                    put.execute(params![model_id, id, v]).store(&path)?;
                }
            }
            let mut fail = tx
                .prepare_cached(
                    "UPDATE samples SET status = 'failed', error = ?2 WHERE id = ?1 AND status = 'embedding' RETURNING job_id",
                )
                .store(&path)?;
            for (id, reason) in failed {
                tally(&mut fail.query(params![id, reason]).store(&path)?, &mut bad).store(&path)?;
            }
        }
        bump_moves(&tx, dataset_id, EMBEDDING, READY, &ready).store(&path)?;
        bump_moves(&tx, dataset_id, EMBEDDING, FAILED, &bad).store(&path)?;
        let moved = ready.values().chain(bad.values()).sum();
        throughput::record(&tx, dataset_id, throughput::EMBED, moved).store(&path)?;
        tx.commit().store(&path)
    }

    /// The bytes of one float16 vector of `model_id`, checked against `n` vectors given in
    /// `len` bytes.
    pub(crate) fn vector_bytes(&self, model_id: i64, n: usize, len: usize) -> Result<usize> {
        let dim: i64 = self
            .conn
            .query_row("SELECT dim FROM models WHERE id = ?1", [model_id], |r| {
                r.get(0)
            })
            .store(&self.path)?;
        let row_bytes = dim as usize * 2;
        if len != n * row_bytes {
            return Err(Error::InvalidArgument(format!(
                "{n} vectors of dimension {dim} need {} bytes, got {len}",
                n * row_bytes
            )));
        }
        Ok(row_bytes)
    }

    /// Put `embedding` rows back to `indexed` (after a crash or a cancel): all of the
    /// dataset's, or only `ids`. With `owner`, only unless another owner holds the `embed`
    /// lease (`LeaseLost` otherwise): the claims out then are the new holder's, and the
    /// old holder's were given back when it took over.
    pub fn release_claims(
        &mut self,
        dataset_id: i64,
        ids: Option<&[i64]>,
        owner: Option<&str>,
    ) -> Result<u64> {
        let path = self.path.clone();
        let tx = self.immediate()?;
        if let Some(owner) = owner {
            not_held_by_another(&tx, &path, dataset_id, EMBED_PHASE, owner)?;
        }
        let mut moves: HashMap<i64, i64> = HashMap::new();
        {
            match ids {
                None => {
                    let n = release_all_claims(&tx, dataset_id).store(&path)?;
                    tx.commit().store(&path)?;
                    return Ok(n);
                }
                Some(ids) => {
                    let mut st = tx
                        .prepare_cached(
                            "UPDATE samples SET status = 'indexed' WHERE id = ?1 AND dataset_id = ?2 AND status = 'embedding' RETURNING job_id",
                        )
                        .store(&path)?;
                    for id in ids {
                        tally(
                            &mut st.query(params![id, dataset_id]).store(&path)?,
                            &mut moves,
                        )
                        .store(&path)?;
                    }
                }
            }
        }
        bump_moves(&tx, dataset_id, EMBEDDING, INDEXED, &moves).store(&path)?;
        tx.commit().store(&path)?;
        Ok(moves.values().sum::<i64>() as u64)
    }

    /// How many embeddings of a dataset's samples by one model were stored after row
    /// `after`: what a reader preallocates before `read_embeddings`. O(rows counted).
    pub fn count_embeddings(&self, dataset_id: i64, model_id: i64, after: i64) -> Result<i64> {
        self.conn
            .prepare_cached(&format!("SELECT count(*) {AFTER_CURSOR}"))
            .store(&self.path)?
            .query_row(params![model_id, dataset_id, after], |r| r.get(0))
            .store(&self.path)
    }

    /// Read the next embeddings of a dataset's samples by one model stored after row `after`,
    /// in row order, straight into the caller's buffers: at most `ids.len()` rows, their
    /// sample ids into `ids` and their float16 bytes into `out` (`ids.len()` rows of
    /// `out.len() / ids.len()` bytes each). Returns `(cursor, rows read)`; pass the cursor
    /// back to read on. A reader that calls this in chunks holds one copy of the vectors.
    pub fn read_embeddings(
        &self,
        dataset_id: i64,
        model_id: i64,
        after: i64,
        ids: &mut [i64],
        out: &mut [u8],
    ) -> Result<(i64, usize)> {
        if ids.is_empty() || out.len() % ids.len() != 0 {
            return Err(Error::InvalidArgument(format!(
                "read_embeddings: a buffer of {} bytes does not hold {} whole rows",
                out.len(),
                ids.len()
            )));
        }
        let row_bytes = out.len() / ids.len();
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT e.id, e.sample_id, e.vector {AFTER_CURSOR} ORDER BY e.id LIMIT ?4"
            ))
            .store(&self.path)?;
        let mut rows = st
            .query(params![model_id, dataset_id, after, ids.len() as i64])
            .store(&self.path)?;
        let (mut cursor, mut n) = (after, 0);
        while let Some(r) = rows.next().store(&self.path)? {
            let v = r
                .get_ref(2)
                .store(&self.path)?
                .as_blob()
                .map_err(rusqlite::Error::from)
                .store(&self.path)?;
            if v.len() != row_bytes {
                return Err(Error::InvalidArgument(format!(
                    "embedding of sample {} has {} bytes, the reader expects {row_bytes}",
                    r.get::<_, i64>(1).store(&self.path)?,
                    v.len()
                )));
            }
            cursor = r.get(0).store(&self.path)?;
            ids[n] = r.get(1).store(&self.path)?;
            out[n * row_bytes..(n + 1) * row_bytes].copy_from_slice(v);
            n += 1;
        }
        Ok((cursor, n))
    }

    /// Embeddings of a dataset's samples by one model, inserted after row `after` (pass 0 for
    /// all; pass the returned cursor to read only what came since), all at once.
    /// Returns `(cursor, sample ids, float16 bytes)`. Search reads with `read_embeddings`.
    pub fn load_embeddings(
        &self,
        dataset_id: i64,
        model_id: i64,
        after: i64,
    ) -> Result<(i64, Vec<i64>, Vec<u8>)> {
        // `+e.model_id`: walk the rowid range above the cursor (a top-up reads what came
        // since), never the (model, sample) index, which reads every vector of the model
        // and sorts them before the first new one comes out.
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT e.id, e.sample_id, e.vector {AFTER_CURSOR} ORDER BY e.id"
            ))
            .store(&self.path)?;
        let mut rows = st
            .query(params![model_id, dataset_id, after])
            .store(&self.path)?;
        let (mut cursor, mut ids, mut bytes) = (after, Vec::new(), Vec::new());
        while let Some(r) = rows.next().store(&self.path)? {
            cursor = r.get(0).store(&self.path)?;
            ids.push(r.get(1).store(&self.path)?);
            let v = r
                .get_ref(2)
                .store(&self.path)?
                .as_blob()
                .map_err(rusqlite::Error::from)
                .store(&self.path)?;
            bytes.extend_from_slice(v);
        }
        Ok((cursor, ids, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::tests::{big_dataset, vm_steps};

    #[test]
    fn a_claim_and_a_sweep_read_only_the_queue() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path().join("s.db").to_str().unwrap()).unwrap();
        let (d, _, _) = big_dataset(&mut s, 50_000);
        s.conn
            .execute(
                "UPDATE samples SET status = 'ready' WHERE id NOT IN (5, 40000, 49999)",
                [],
            )
            .unwrap();
        // a final sweep from 0, as the embedder makes when its cursor runs dry
        let tx = s.conn.unchecked_transaction().unwrap();
        let steps = vm_steps(&s, CLAIM, params![d, 64, 0]);
        tx.rollback().unwrap();
        assert!(steps < 400, "{steps} steps to claim 3 rows of 50,000");
        let got: Vec<i64> = s
            .claim_for_embedding(d, 64, 0, None)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(got, [5, 40_000, 49_999]);
        // giving claims back walks only the claimed rows
        let steps = vm_steps(
            &s,
            "UPDATE samples SET status = 'indexed' WHERE dataset_id = ?1 AND status = 'embedding' RETURNING job_id",
            [d],
        );
        assert!(steps < 400, "{steps} steps to release 3 rows of 50,000");
    }
}
