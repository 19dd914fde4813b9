//! Training batches from a packed artifact: which rows each step reads (a pure function of
//! the step, so a resumed run reads exactly what an uninterrupted one would), and the
//! conversion of rows into next-token targets.

use std::path::Path;

use crate::cpu::batch::Batch;
use crate::data::pack::{Packed, PackedRow, RowReader};
use crate::data::rng::Rng;
use crate::kind::StageError;

/// How attention sees packed rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Plain causal attention over the whole row, positions 0..seq_len (what LLM Foundry
    /// does with concatenated documents).
    Causal,
    /// Block-diagonal: each document attends to itself only, positions restart per document.
    Document,
}

/// The rows of the data set in the order training visits them: the stored order first
/// (pack shuffled it), then a fresh seeded permutation for each further epoch.
pub struct Order {
    rows: usize,
    seed: u64,
    epoch: Option<(u64, Vec<u32>)>,
}

impl Order {
    pub fn new(rows: usize, seed: u64) -> Order {
        Order {
            rows,
            seed,
            epoch: None,
        }
    }

    /// The row read as the `sample`-th training example (0-based over all epochs).
    pub fn row(&mut self, sample: u64) -> usize {
        let epoch = sample / self.rows as u64;
        let i = (sample % self.rows as u64) as usize;
        if epoch == 0 {
            return i;
        }
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<u32> = (0..self.rows as u32).collect();
            Rng::new(self.seed)
                .fork(&format!("epoch-{epoch}"))
                .shuffle(&mut perm);
            self.epoch = Some((epoch, perm));
        }
        self.epoch.as_ref().expect("set above").1[i] as usize
    }
}

/// Turns packed rows into a batch: position t predicts token t+1 where the loss mask marks
/// t+1 as a target (and, with document attention, t+1 is in the same document).
pub fn batch(rows: &[PackedRow], attention: Attention) -> Batch {
    let seq = rows.first().map_or(0, |r| r.ids.len());
    let mut b = Batch {
        rows: rows.len(),
        seq,
        ids: Vec::with_capacity(rows.len() * seq),
        targets: Vec::with_capacity(rows.len() * seq),
        pos: Vec::with_capacity(rows.len() * seq),
        lens: None,
        seq_ids: (attention == Attention::Document).then(|| Vec::with_capacity(rows.len() * seq)),
    };
    for r in rows {
        b.ids.extend_from_slice(&r.ids);
        let mut p = 0u32;
        for t in 0..seq {
            let same_doc = |a: usize, c: usize| r.seq[a] == r.seq[c] && r.seq[a] != 0;
            let target = t + 1 < seq
                && r.mask[t + 1] == 1
                && (attention == Attention::Causal || same_doc(t, t + 1));
            b.targets
                .push(if target { r.ids[t + 1] as i32 } else { -1 });
            match attention {
                Attention::Causal => b.pos.push(t as u32),
                Attention::Document => {
                    if t > 0 && r.seq[t] == r.seq[t - 1] {
                        p += 1;
                    } else {
                        p = 0;
                    }
                    b.pos.push(p);
                }
            }
        }
        if let Some(s) = &mut b.seq_ids {
            s.extend_from_slice(&r.seq);
        }
    }
    b
}

/// Reads the rows of one micro-batch.
pub fn read_rows(
    reader: &RowReader,
    order: &mut Order,
    first_sample: u64,
    count: usize,
) -> Result<Vec<PackedRow>, StageError> {
    (0..count as u64)
        .map(|j| reader.row(order.row(first_sample + j)))
        .collect()
}

/// The first `rows` rows of the `heldout` input (`dir`), when there is one.
pub fn heldout_rows(dir: Option<&Path>, rows: usize) -> Result<Option<Vec<PackedRow>>, StageError> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let packed = Packed::open(dir)?;
    let reader = packed.reader()?;
    let n = rows.min(reader.rows);
    let rows = (0..n).map(|i| reader.row(i)).collect::<Result<_, _>>()?;
    Ok(Some(rows))
}

/// A step's rows as micro-batches of `micro` rows, and the targets they hold in all. A token
/// id outside the model's vocabulary (`max_id`), or a step without a target, is an error.
pub fn step_batches(
    rows: &[PackedRow],
    micro: usize,
    attention: Attention,
    max_id: usize,
    data_dir: &Path,
    step: u64,
) -> Result<(Vec<Batch>, usize), StageError> {
    if let Some(bad_id) = rows
        .iter()
        .flat_map(|r| &r.ids)
        .find(|&&id| id as usize >= max_id)
    {
        return Err(StageError::Failed(format!(
            "token id {bad_id} in {} is outside the model's vocabulary ({max_id})",
            data_dir.display()
        )));
    }
    let batches: Vec<Batch> = rows.chunks(micro).map(|c| batch(c, attention)).collect();
    let targets: usize = batches.iter().map(|b| b.target_count()).sum();
    if targets == 0 {
        return Err(StageError::Failed(format!(
            "step {}: the batch has no training targets (all masked)",
            step + 1
        )));
    }
    Ok((batches, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_the_mask_and_documents() {
        let row = PackedRow {
            ids: vec![1, 10, 11, 2, 1, 20, 2, 0],
            mask: vec![0, 1, 1, 1, 0, 1, 1, 0],
            seq: vec![1, 1, 1, 1, 2, 2, 2, 0],
        };
        let c = batch(std::slice::from_ref(&row), Attention::Causal);
        assert_eq!(c.targets, vec![10, 11, 2, -1, 20, 2, -1, -1]);
        assert_eq!(c.pos, (0..8).collect::<Vec<u32>>());
        let d = batch(&[row], Attention::Document);
        assert_eq!(d.targets, vec![10, 11, 2, -1, 20, 2, -1, -1]);
        assert_eq!(d.pos, vec![0, 1, 2, 3, 0, 1, 2, 0]);
    }

    #[test]
    fn later_epochs_are_permutations_and_repeat() {
        let mut o = Order::new(10, 3);
        let first: Vec<usize> = (0..10).map(|s| o.row(s)).collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let mut second: Vec<usize> = (10..20).map(|s| o.row(s)).collect();
        let again: Vec<usize> = (10..20).map(|s| Order::new(10, 3).row(s)).collect();
        assert_eq!(second, again);
        assert_ne!(second, first);
        second.sort();
        assert_eq!(second, first);
    }
}
