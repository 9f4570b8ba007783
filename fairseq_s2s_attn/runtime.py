"""Run-time defaults and fixes applied when fairseq loads the plugin.

- CPU threads: recurrent models run many small matrix products per step, which intra-op threads
  slow down (fairseq's lstm on 2 cores: 26k words/s with 1 thread, 3.7k with 2). Unless the user
  set OMP_NUM_THREADS (or S2S_NUM_THREADS), torch gets one intra-op thread; data-parallel
  processes (see README) use the other cores.
- fairseq's ``batch_by_size`` drops the last batch when its size is not a multiple of
  --required-batch-size-multiple (default 8), so fairseq-generate silently skips up to 7
  sentences of a test set and BLEU is computed on fewer sentences. We keep that batch.
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)


def set_thread_defaults() -> None:
    threads = os.environ.get("S2S_NUM_THREADS")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def keep_remainder_batches() -> None:
    from fairseq.data import data_utils

    original = data_utils.batch_by_size
    if getattr(original, "_keeps_remainder", False):
        return

    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None,
                      max_sentences=None, required_batch_size_multiple=1, fixed_shapes=None):
        batches = original(indices, num_tokens_fn, num_tokens_vec=num_tokens_vec,
                           max_tokens=max_tokens, max_sentences=max_sentences,
                           required_batch_size_multiple=required_batch_size_multiple,
                           fixed_shapes=fixed_shapes)
        if fixed_shapes is not None:
            return batches
        kept = sum(len(b) for b in batches)
        if kept < len(indices):  # batches are consecutive runs of indices: the tail was dropped
            batches = list(batches) + [list(indices[kept:])]
        return batches

    batch_by_size._keeps_remainder = True
    data_utils.batch_by_size = batch_by_size


def install() -> None:
    set_thread_defaults()
    keep_remainder_batches()
