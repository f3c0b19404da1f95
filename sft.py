"""
Supervised fine-tuning on math conversations (ChatML), loss on assistant tokens only, tau frozen at 0.1.

    deepspeed sft.py config/sft.py                        # from checkpoints/portable_final.pt
    python sft.py config/tiny_sft.py                      # CPU demo
    python sft.py config/sft.py --init_from=checkpoints/vanilla/portable_final.pt --model_type=vanilla
    deepspeed sft.py config/sft.py --init_from=hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B   # the published base

Data: prepare.py --source=sft writes chunks of token ids with a loss mask (1 on assistant content and its
closing <|im_end|>), every conversation ending with EOS. Conversations are packed whole into rows of block_size
tokens with document masking (cu_seqlens from EOS, as in pre-training), never padded: padding would move the
mean-pooled PolyGLU gate. When the next conversation does not fit, the rest of the row holds its beginning as
context only (no loss there), and the conversation starts again whole, and trained, in the next row: every trained
token sees its own conversation from the start, and no assistant token is trained twice in an epoch. The loss is the
mean over every assistant token of the step, across micro-batches and ranks. The packing of each epoch follows from
(seed, epoch): resume is exact. A val_fraction of the problems (all their traces) is held out for the validation
loss (per assistant token).
"""
import math
import os
import time

import numpy as np
import torch

from configurator import configure, fail
from model import EOS_ID, LanguageModelLoss, attention_name, flops_per_token, routing_entropy, wrap_model
from utils import (all_reduce_sums, catch_stop_signals, check_resume, close_distributed, cosine_lr, end_of_session,
                   heartbeat, hold_folder, import_training_state, init_distributed, init_wandb, load_checkpoint,
                   log_entry, log_step, make_engine, micro_batch_seed, optimizer_weights, peak_flops, projected_cost,
                   rank_rows, read_manifest, resolve_device, resume_state, run_provenance, save_run, save_snapshot,
                   to_device, trim_log, verified_chunk, watchdog)

# -----------------------------------------------------------------------------
# config (SPEC.md's SFT section; config/sft.py spells out the run)
init_from = 'checkpoints/portable_final.pt'  # a checkpoint, a folder or hf:owner/name (any format load_checkpoint reads)
model_type = 'polyglu'       # what init_from must be: 'polyglu' or 'vanilla' (the baseline fine-tunes the same way)
data_dir = 'data/tokenized/sft'
out_dir = 'checkpoints'
resume = 'auto'              # 'auto': continue from the newest SFT checkpoint in out_dir; '' = start from init_from
block_size = 4096
long_conversations = 'truncate'  # 'truncate' (cut the end of the assistant turn) | 'skip' a conversation > block_size
val_fraction = 0.01          # held-out share of the problems (every trace of a held-out problem)
epochs = 2
micro_batch_size = 2
grad_accum_steps = 16
learning_rate = 2e-5         # linear warm-up, then cosine to min_lr over all epochs
min_lr = 2e-6
warmup_steps = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-8
grad_clip = 1.0
tau = 0.1                    # frozen for the whole run (pre-training ends at 0.1)
backend = 'deepspeed'        # 'deepspeed' | 'torch'
zero_stage = 1
device = 'auto'
dtype = 'auto'
attention = 'auto'           # CUDA kernel: 'auto' = flash-attn if installed, else torch's varlen_attn, else 'sdpa'
recompute_blocks = 0         # blocks that recompute their activations in the backward, from the first; -1 = all
fused = False                # torch.compile'd elementwise kernels (RMSNorm, the PolyGLU mix): less memory, fewer passes
loss_chunk_size = 2048
loss_kernel = 'chunked'      # the speed levers of train.py, off until measured: 'liger' fuses the head and the loss
lean_mix = False
compile_blocks = False
fused_adamw = False
selective_checkpointing = False
seed = 1337
max_bad_steps = 10           # non-finite loss/grad steps in a row before the run stops
collective_timeout_s = 300   # after the first step: a step or validation not done in this long ends the run, as in
save_timeout_s = 1200        # train.py (docs/gpu.md, "Timeouts and hangs")
peak_flops_override = 0.0    # device peak FLOP/s for MFU; 0 = from the GPU's name (A100/H100/H200), none on CPU
log_interval = 10
eval_interval = 200
checkpoint_interval = 500
keep_checkpoints = 2
snapshot_interval = 0        # steps: the weights alone (bf16) in {out_dir}/snapshots/snapshot_sft_{step}.pt, never pruned,
                             # and at the end, as in train.py (analyze.py --run, eval.py --checkpoints); 0 = none
ds_checkpoint = False        # also write DeepSpeed's own checkpoint (ds_checkpoint_sft/); nothing here reads it
stop_after_steps = 0         # end this session (with a checkpoint) after this many steps; 0 = run to the end
wandb_log = False
wandb_project = 'polychromatic'
wandb_run_name = 'sft'
# -----------------------------------------------------------------------------


def load_conversations():
    """The SFT chunks, memory-mapped, as (tokens, masks, starts, lengths, problems): tokens and masks are (chunks,
    offsets) stores read with `piece`, each conversation is the span [start, start + length) of the global stream,
    and problems[i] the id of its problem. A conversation never crosses a chunk (prepare.py ends chunks on
    conversation boundaries)."""
    manifest = read_manifest(data_dir, missing_hint='run `python prepare.py --source=sft`')
    if not manifest.get('complete') or not all('mask_file' in c for c in manifest['chunks']):
        fail(f"{data_dir} is not a complete SFT preparation (tokens + loss masks): run "
             "`python prepare.py --source=sft` (it resumes)")
    if not all('problems_sha256' in c for c in manifest['chunks']):
        fail(f"{data_dir} records no checksummed problem id per conversation: prepare it again into a new output_base")
    tokens, masks, starts, problems = [], [], [], []
    offsets = np.concatenate([[0], np.cumsum([entry['tokens'] for entry in manifest['chunks']])])
    for entry, offset in zip(manifest['chunks'], offsets):
        file, mask_file = (os.path.join(data_dir, entry[k]) for k in ('file', 'mask_file'))
        if not os.path.isfile(file) or os.path.getsize(file) != 4 * entry['tokens'] or \
                not os.path.isfile(mask_file) or os.path.getsize(mask_file) != entry['tokens']:
            fail(f"{file} or its mask does not match the manifest (truncated or foreign chunk): check with "
                 f"`python prepare.py --verify={data_dir}`")
        tokens.append(np.memmap(verified_chunk(data_dir, entry), dtype=np.uint32, mode='r'))
        masks.append(np.memmap(verified_chunk(data_dir, entry, 'mask_file', 'mask_sha256'), dtype=np.uint8, mode='r'))
        ends = np.flatnonzero(tokens[-1] == EOS_ID) + 1
        starts.append(offset + np.concatenate([[0], ends[:-1]]))
        # the held-out split is chosen by problem: damaged ids would move held-out conversations into training
        problems.append(np.fromfile(verified_chunk(data_dir, entry, 'problems_file', 'problems_sha256'),
                                    dtype=np.uint64))
        if problems[-1].size != ends.size:
            fail(f"{entry['problems_file']} lists {problems[-1].size} problems for {ends.size} conversations: "
                 "prepare the SFT data again")
    starts = np.concatenate(starts)
    lengths = np.diff(np.append(starts, offsets[-1]))
    return (tokens, offsets), (masks, offsets), starts, lengths, np.concatenate(problems)


def held_out_problems(problems, fraction):
    """Every trace of a val_fraction of the problems (at least one), chosen by id (a hash): a problem never has
    traces on both sides. -> boolean mask over the conversations."""
    unique = np.unique(problems)
    chosen = unique[:max(1, int(round(fraction * unique.size)))]
    return np.isin(problems, chosen)


def piece(store, start, n):
    """n values of a (chunks, offsets) store from global position start, within one chunk."""
    arrays, offsets = store
    chunk = int(np.searchsorted(offsets, start, side='right')) - 1
    local = int(start - offsets[chunk])
    return arrays[chunk][local:local + n]


def pack(starts, lengths, order, capacity, keep_partial=False):
    """Rows of exactly `capacity` tokens from whole conversations in `order` -> list of rows, each a list of
    (start, length, trained) spans. A conversation that does not fit fills the rest of the row with its beginning,
    untrained (context for the gate, no loss), and starts whole, and trained, in the next row. The last, partial row
    is dropped (training) or kept shorter (validation)."""
    rows, row, used = [], [], 0
    for i in order:
        start, length = int(starts[i]), int(lengths[i])
        if used + length > capacity:
            row.append((start, capacity - used, False))
            rows.append(row)
            row, used = [], 0
        row.append((start, length, True))
        used += length
        if used == capacity:
            rows.append(row)
            row, used = [], 0
    if row and keep_partial:
        rows.append(row)
    return rows


def row_arrays(tokens, masks, row):
    ids = np.concatenate([piece(tokens, s, n) for s, n, _ in row]).astype(np.int64)
    mask = np.concatenate([piece(masks, s, n) * trained for s, n, trained in row])
    return ids, mask


def split_conversations(lengths, problems):
    """The conversations to train on and to hold out, by problem, after long_conversations is applied -> (lengths,
    training ids, held-out ids, how many were longer than a row)."""
    capacity = block_size + 1  # x and y are the row shifted by one
    too_long = lengths > capacity
    if long_conversations == 'truncate':
        lengths = np.minimum(lengths, capacity)  # keeps the beginning: the end of the assistant turn is cut
        keep = np.ones(len(lengths), dtype=bool)
    else:
        keep = ~too_long
    held_out = held_out_problems(problems, val_fraction)
    train_ids, val_ids = np.flatnonzero(keep & ~held_out), np.flatnonzero(keep & held_out)
    return lengths, train_ids, val_ids, int(too_long.sum())


def load_model():
    """The pre-trained checkpoint, wrapped for training, tau frozen."""
    model, pretrained = load_checkpoint(init_from)
    if model.config.model_type != model_type:
        fail(f"{init_from} is a {model.config.model_type} model but model_type={model_type!r}: fix model_type or "
             "pick the matching checkpoint")
    if block_size > model.config.max_seq_len:
        fail(f"block_size={block_size} exceeds the model's max_seq_len={model.config.max_seq_len}")
    wrap_model(model.to(device).train(), attention=attention, fused=fused, lean_mix=lean_mix,
               compile_blocks=compile_blocks, recompute_blocks=recompute_blocks,
               selective_checkpointing=selective_checkpointing)
    model.set_tau(tau)
    return model, pretrained


def resume_run(path, state, model, loss_engine, optimizer, rows_per_step, world_size, is_master):
    """Continue from the newest SFT checkpoint, on any number of ranks with the same global batch -> its step."""
    if state.get('init_from') != init_from:
        fail(f"{out_dir} holds an SFT run from init_from={state.get('init_from')!r} ({path}), not {init_from!r}: "
             "use a new out_dir, or resume='' to start over from the new init_from")
    check_resume(path, state, backend, dtype, rows_per_step, f"{micro_batch_size} x {grad_accum_steps} x {world_size} ranks")
    model.load_state_dict(state['model_state_dict'])
    import_training_state(loss_engine, optimizer, model, backend, state['optimizer_state_dict'])
    if state['step'] and is_master:
        print(f"resumed from SFT step {state['step']}")
        trim_log(os.path.join(out_dir, 'sft_log.jsonl'), state['step'])
    return state['step']


@torch.no_grad()
def evaluate(loss_engine, autocast, tokens, masks, val_rows, rank, world_size):
    """Validation loss per assistant token over the held-out conversations."""
    loss_engine.eval()
    total, count = 0.0, 0
    full, partial = val_rows[:-1], val_rows[-1:]  # only the last row may be shorter; it runs alone
    batches = [full[i:i + micro_batch_size] for i in range(0, len(full), micro_batch_size)] + [partial]
    for batch in batches[rank::world_size]:  # sharded over the ranks, the sums all-reduced
        x, y, cu_seqlens, max_seqlen = batch_to_device(tokens, masks, batch)
        n = int((y != -100).sum())
        if n:
            with autocast:
                total += loss_engine(x, y, cu_seqlens, max_seqlen).item() * n
            count += n
    total, count = all_reduce_sums([total, count], world_size, device)
    loss_engine.train()
    return total / max(1, count)


def batch_to_device(tokens, masks, batch):
    """Packed rows -> x, targets (-100 where the target is not an assistant token), cu_seqlens."""
    ids, trained = zip(*(row_arrays(tokens, masks, row) for row in batch))
    return to_device(np.stack(ids), device, trained=np.stack(trained))


def step_batches(tokens, masks, rows, step, rank, world_size):
    """This rank's micro-batches of a step, and each one's loss weight: its share of the step's assistant tokens, so
    that the step's gradient is that of the mean per assistant token over the whole step (every rank's rows are known
    here, so no communication)."""
    micro_batches = [batch_to_device(tokens, masks, [rows[i] for i in rank_rows(step, micro_step, rank, world_size,
                                                                               micro_batch_size, grad_accum_steps)])
                     for micro_step in range(grad_accum_steps)]
    rows_per_step = micro_batch_size * grad_accum_steps * world_size
    step_targets = sum(int(row_arrays(tokens, masks, r)[1][1:].sum()) for r in rows[step * rows_per_step:
                                                                                     (step + 1) * rows_per_step])
    return micro_batches, [int((y != -100).sum()) * grad_accum_steps * world_size / max(1, step_targets)
                           for _, y, _, _ in micro_batches]


def main():
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    if long_conversations not in ('truncate', 'skip'):
        fail(f"long_conversations must be 'truncate' or 'skip', got {long_conversations!r}")
    rank, world_size, device = init_distributed(backend, device)
    is_master = rank == 0
    hold_folder(out_dir, rank)  # one run per out_dir, on every rank: a second one stops here, naming this one

    # data: conversations, the held-out slice, the packing of every epoch
    tokens, masks, starts, lengths, problems = load_conversations()
    provenance = run_provenance([data_dir], globals())  # sample.py, eval.py and export.py read it
    lengths, train_ids, val_ids, too_long = split_conversations(lengths, problems)
    rows = [row for epoch in range(epochs)
            for row in pack(starts, lengths, np.random.default_rng([seed, epoch]).permutation(train_ids), block_size + 1)]
    val_rows = pack(starts, lengths, val_ids, block_size + 1, keep_partial=True)
    rows_per_step = micro_batch_size * grad_accum_steps * world_size
    tokens_per_step, max_steps = rows_per_step * block_size, len(rows) // rows_per_step
    if max_steps == 0:
        fail(f"{len(rows)} packed rows are fewer than one step's {rows_per_step}: lower micro_batch_size or "
             "grad_accum_steps, or prepare more conversations")

    model, pretrained = load_model()
    loss_engine, optimizer, autocast = make_engine(LanguageModelLoss(model, loss_chunk_size, loss_kernel), model,
                                                   globals())
    path, state = resume_state(out_dir, 'portable_sft_', is_master) if resume else (None, None)
    start_step = resume_run(path, state, model, loss_engine, optimizer, rows_per_step, world_size, is_master) \
        if state is not None else 0
    if start_step >= max_steps:
        print(f"already fine-tuned to {max_steps} steps; nothing to do")
        return
    flops_per_step = flops_per_token(model.config, block_size) * tokens_per_step
    if is_master:
        assistant_tokens = int(sum(piece(masks, s, n).sum() for s, n in zip(starts[train_ids], lengths[train_ids])))
        print(f"SFT from {init_from} (pre-training step {pretrained['step']}, tau {pretrained['tau']}) | "
              f"{len(train_ids):,} conversations ({assistant_tokens:,} assistant tokens), {len(val_ids):,} held out | "
              f"{too_long:,} longer than {block_size + 1} tokens ({long_conversations}) | {epochs} epochs = "
              f"{max_steps:,} steps of {tokens_per_step:,} tokens | {backend} {device} {dtype} | attention "
              f"{attention_name(model)}")
        print(projected_cost(flops_per_step / tokens_per_step, max_steps * tokens_per_step,
                             f", {len(np.unique(problems[train_ids])):,} problems"))
    ds_dir = os.path.join(out_dir, 'ds_checkpoint_sft') if backend == 'deepspeed' and ds_checkpoint else None
    log_path, peak = os.path.join(out_dir, 'sft_log.jsonl'), peak_flops(device, peak_flops_override) * world_size

    def weights_info(step):
        return dict(init_from=init_from, stage='sft', tokens=step * tokens_per_step, world_size=world_size, **provenance)

    def save(step, final=False):
        """On every rank (utils.save_run)."""
        heartbeat(f'the save at step {step}', save_timeout_s)
        save_run(out_dir, 'portable_sft_', step, final, (loss_engine, optimizer, model, backend, ds_dir),
                 keep_checkpoints, is_master, {'schedule': 'linear warmup + cosine', 'step': step,
                                               'learning_rate': learning_rate, 'min_lr': min_lr,
                                               'warmup_steps': warmup_steps, 'max_steps': max_steps},
                 rows_per_step=rows_per_step, **weights_info(step))

    def validate(done):
        heartbeat(f'the validation at step {done}', collective_timeout_s if done > start_step else 0)
        val_loss = evaluate(loss_engine, autocast, tokens, masks, val_rows, rank, world_size)
        if is_master:
            print(f"step {done}: validation loss {val_loss:.4f} per assistant token")
            log_entry(log_path, wandb_run, done, {'train/tokens': done * tokens_per_step, 'val/loss': val_loss})

    stop_signal = catch_stop_signals()
    wandb_run = init_wandb(wandb_log and is_master, wandb_project, wandb_run_name, globals())
    with watchdog(rank, world_size, f"the last checkpoint in {out_dir} is intact: resume with the same command once "
                  "every rank is healthy"):
        if not start_step and eval_interval:
            validate(0)
        loss_engine.train()
        bad_in_a_row, skipped, timer, last_logged = 0, 0, time.perf_counter(), start_step
        for step in range(start_step, max_steps):
            heartbeat(f'step {step}', collective_timeout_s if step > start_step else 0)  # the first compiles
            if any(getattr(b.ffn, 'tau', tau) != tau for b in model.model_core):
                fail(f"tau moved away from {tau} during SFT")  # frozen, and checked: nothing may anneal it here
            lr = cosine_lr(step, learning_rate, warmup_steps, max_steps, min_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr
            # forward and backward, each micro-batch's loss weighted by its share of the step's assistant tokens: the
            # step's gradient is that of the mean per assistant token over all micro-batches and ranks
            micro_batches, weights = step_batches(tokens, masks, rows, step, rank, world_size)
            losses = []
            for micro_step, ((x, y, cu_seqlens, max_seqlen), weight) in enumerate(zip(micro_batches, weights)):
                torch.manual_seed(micro_batch_seed(seed, step, micro_step * world_size + rank))
                with autocast:
                    loss = loss_engine(x, y, cu_seqlens, max_seqlen) * weight
                if backend == 'deepspeed':
                    loss_engine.backward(loss)
                    loss_engine.step()  # DeepSpeed clips and updates at the accumulation boundary only
                else:
                    (loss / grad_accum_steps).backward()
                losses.append(loss.detach().float())
            loss = all_reduce_sums([torch.stack(losses).mean().item()], world_size, device)[0] / world_size
            # clip and update; a non-finite loss or gradient norm skips the update (DeepSpeed's overflow check skips it)
            if backend == 'deepspeed':
                grad_norm = float(loss_engine.get_global_grad_norm() or 0.0)
                applied = loss_engine.was_step_applied() and math.isfinite(loss) and math.isfinite(grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(optimizer_weights(optimizer), grad_clip).item()
                applied = math.isfinite(loss) and math.isfinite(grad_norm)
                if applied:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done = step + 1

            bad_in_a_row, skipped = (0, skipped) if applied else (bad_in_a_row + 1, skipped + 1)
            if not applied and is_master:
                print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}: update skipped "
                      f"({bad_in_a_row} in a row, {skipped} in all)")
            if bad_in_a_row >= max_bad_steps:
                fail(f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping; the last good checkpoint in "
                     f"{out_dir} is intact (lower learning_rate or check the data, then resume)")
            if applied and is_master and (done % log_interval == 0 or done == max_steps):
                log_step(log_path, wandb_run, done, max_steps, {
                    'train/loss': loss, 'train/lr': lr, 'train/tau': tau, 'train/grad_norm': grad_norm,
                    'train/skipped_steps': skipped, 'train/tokens': done * tokens_per_step, **routing_entropy(model)},
                    (done - last_logged, time.perf_counter() - timer), (tokens_per_step, flops_per_step, peak), device)
                timer, last_logged = time.perf_counter(), done
            if eval_interval and (done % eval_interval == 0 or done == max_steps):
                validate(done)
            stop_reason = end_of_session(stop_signal, stop_after_steps, done - start_step, world_size)
            if done < max_steps and (stop_reason or (checkpoint_interval and done % checkpoint_interval == 0)):
                save(done)
            if is_master and snapshot_interval and (done % snapshot_interval == 0 or done == max_steps):
                heartbeat(f'the snapshot at step {done}', save_timeout_s)
                save_snapshot(out_dir, f'snapshot_sft_{done}.pt', model, done, weights_info(done))
            if stop_reason and done < max_steps:
                if is_master:
                    print(f"{stop_reason}: checkpoint saved at step {done}; resume with the same command")
                return
        save(max_steps, final=True)
    if wandb_run:
        wandb_run.finish()


if __name__ == '__main__':
    configure(globals())
    main()
    close_distributed()
