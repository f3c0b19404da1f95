"""
Generate text from a checkpoint, or chat with a fine-tuned one (nanoGPT's sample.py, for this model).

    python sample.py --checkpoint=checkpoints/portable_final.pt --prompt="The derivative of x^3 is"
    python sample.py --checkpoint=hf:tylerxdurden/PolyChromaticLM-1.0-base-0.6B --prompt=FILE:prompt.txt --num_samples=3
    python sample.py --checkpoint=checkpoints/portable_sft_final.pt      # chat: the default for fine-tuned models

Tokens stream to the terminal as they are generated; tokens/s are printed at the end. Generation is exact by default:
the PolyGLU gate reads a mean over the whole sequence, so each new token changes every earlier position's FFN output
and a key/value cache would be stale; every token is a full forward (model.generate_exact, the code eval.py generates
with). generation='cached' is the fast approximation (model.generate_cached), and says what bound it keeps.

Chat wraps the turns in the ChatML that sft.py trained on, ends each reply at <|im_end|>, drops the oldest turns when
the conversation outgrows max_seq_len, and ends on EOF (Ctrl-D) or Ctrl-C.
"""
import os
import sys
import time

import torch

from configurator import configure, fail
from model import EOS_ID, generate_cached, generate_exact, sampler, wrap_model
from utils import chatml, checkpoint_tokenizer, fine_tuned, get_tokenizer, load_checkpoint, resolve_device

# -----------------------------------------------------------------------------
# config
checkpoint = 'checkpoints/portable_final.pt'  # any path, folder or hf:owner/name that load_checkpoint reads
prompt = ''                  # the text to continue, or FILE:path ('' = a new document); chat: a first message
num_samples = 1              # samples of the prompt, one after another
max_new_tokens = 200         # per sample, or per chat reply
temperature = 0.8            # 0 = greedy (the argmax, what eval.py generates)
top_k = 200                  # sample among the top_k tokens (0 = all)
seed = 1337
chat = None                  # None = True for fine-tuned models (as eval.py decides)
system = ''                  # chat: a system turn at the start
generation = 'exact'         # 'exact' | 'cached' (approximate, faster)
refresh_threshold = 0.05     # cached: a full forward when any routing weight has moved more than this since the last
tokenizer = 'auto'           # 'auto': beside the checkpoint, else its data's, else the Qwen3 hub tokenizer; or a path
device = 'auto'
dtype = 'auto'
attention = 'auto'
# -----------------------------------------------------------------------------


def read_prompt():
    if not prompt.startswith('FILE:'):
        return prompt
    path = prompt[len('FILE:'):]
    if not os.path.isfile(path):
        fail(f"prompt file {path} not found (--prompt=FILE:path reads a text file)")
    with open(path, encoding='utf-8') as f:
        return f.read()


def stream(model, tok, ids, max_new, pick, stop_ids, stats):
    """Generate after ids, printing the text as it comes (a token that ends mid-character waits for the next) ->
    the new token ids, the stop token excluded. stats counts tokens and seconds (and the cache's refreshes)."""
    stop = lambda i, generated: generated[-1] in stop_ids  # noqa: E731
    if generation == 'cached':
        events = generate_cached(model, [(ids, max_new)], refresh_threshold, pick, stop, stats)
    else:
        events = generate_exact(model, [(ids, max_new)], model.config.max_seq_len, pick, stop)
    generated, shown, start = [], '', time.perf_counter()
    for _, token, _ in events:
        if token is None:
            break
        stats['tokens'] = stats.get('tokens', 0) + 1
        if token in stop_ids:
            break
        generated.append(token)
        text = tok.decode(generated, skip_special_tokens=False)
        if not text.endswith('\ufffd'):
            print(text[len(shown):], end='', flush=True)
            shown = text
    stats['seconds'] = stats.get('seconds', 0.0) + time.perf_counter() - start
    return generated


def fit_conversation(model, tok, messages):
    """The ChatML ids of the conversation, oldest turns dropped (the system turn kept) until the reply has room within
    max_seq_len -> (ids, turns dropped, new tokens allowed), or None when the last message alone leaves no room (then
    the conversation is left as it was)."""
    limit, dropped, kept = model.config.max_seq_len, 0, list(messages)
    while True:
        ids = tok.encode(chatml(messages), add_special_tokens=False).ids
        first = 1 if messages[0]['role'] == 'system' else 0
        if len(ids) + max_new_tokens <= limit or len(messages) - first <= 1:
            break
        del messages[first:first + 2]  # a user turn and its reply
        dropped += 2
    room = min(max_new_tokens, limit - len(ids))
    if room <= 0:
        messages[:] = kept
        return None
    return ids, dropped, room


def chat_loop(model, tok, pick, stats):
    im_end = tok.token_to_id('<|im_end|>')
    if im_end is None:
        fail("the tokenizer has no <|im_end|>: chat needs the ChatML tokens sft.py trained on (use the Qwen3 one)")
    messages = [{'role': 'system', 'content': system}] if system else []
    first = read_prompt()
    print("chat: ChatML turns as sft.py trained them, replies end at <|im_end|>; Ctrl-D or Ctrl-C ends", flush=True)
    while True:
        try:
            text, first = (first, '') if first else (input('user> '), '')
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text.strip():
            continue
        if not sys.stdin.isatty():  # piped turns: echo them, so the transcript reads as a conversation
            print(text, flush=True)
        messages.append({'role': 'user', 'content': text})
        fitted = fit_conversation(model, tok, messages)
        if fitted is None:
            length = len(tok.encode(chatml(messages[-1:]), add_special_tokens=False).ids)
            print(f"error: that message is {length:,} tokens in ChatML, no room for a reply within "
                  f"max_seq_len={model.config.max_seq_len:,}: shorten it", flush=True)
            messages.pop()
            continue
        ids, dropped, room = fitted
        if dropped:
            print(f"(the {dropped} oldest turns no longer fit max_seq_len={model.config.max_seq_len:,}: dropped)")
        print('assistant> ', end='', flush=True)
        try:
            reply = stream(model, tok, ids, room, pick, {im_end, EOS_ID}, stats)
        except KeyboardInterrupt:
            print()
            return
        print(flush=True)
        messages.append({'role': 'assistant', 'content': tok.decode(reply, skip_special_tokens=False)})


def main():
    global device, dtype
    device, dtype = resolve_device(device, dtype)
    if generation not in ('exact', 'cached'):
        fail(f"generation must be 'exact' or 'cached', got {generation!r}")
    model, info = load_checkpoint(checkpoint)
    model = model.to(device=device, dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32).eval()
    wrap_model(model, attention=attention, segment_pooling=True)
    tok = get_tokenizer(checkpoint_tokenizer(info, tokenizer), model.config.vocab_size)
    use_chat = fine_tuned(info, checkpoint) if chat is None else bool(chat)
    print(f"{checkpoint} ({info['format']}): {model.config.model_type}, step {info['step']} | {device} {dtype} | "
          f"{'chat' if use_chat else 'text'}, {'greedy' if temperature <= 0 else f'temperature {temperature}, top_k {top_k}'}"
          f", {generation} generation", file=sys.stderr)
    if generation == 'cached':
        print(f"cached generation is approximate: keys/values are reused until some routing weight has moved more than "
              f"refresh_threshold={refresh_threshold} since the last full forward (then one is run); the text may "
              f"differ from exact generation", file=sys.stderr)
    pick, stats = sampler(temperature, top_k, seed), {}
    try:
        if use_chat:
            chat_loop(model, tok, pick, stats)
        else:
            text = read_prompt()
            if not text and EOS_ID >= model.config.vocab_size:
                fail(f"a model of vocab_size {model.config.vocab_size} has no <|endoftext|> to start a document: "
                     "give a --prompt")
            ids = tok.encode(text, add_special_tokens=False).ids if text else [EOS_ID]  # a new document
            if len(ids) >= model.config.max_seq_len:
                fail(f"the prompt is {len(ids):,} tokens; the model reads at most max_seq_len="
                     f"{model.config.max_seq_len:,} and needs room to write: shorten it")
            for k in range(num_samples):
                print(text, end='', flush=True)
                stream(model, tok, ids, max_new_tokens, pick, {EOS_ID}, stats)
                print('\n' + '-' * 40 if k + 1 < num_samples else '', flush=True)
    except KeyboardInterrupt:
        print()
    if stats.get('tokens'):
        refreshes = (f"; {stats['refreshes']} full refreshes in {stats['cached_steps']} cached steps"
                     if generation == 'cached' else '')
        print(f"{stats['tokens']:,} new tokens in {stats['seconds']:.1f}s: {stats['tokens'] / stats['seconds']:.1f} "
              f"tokens/s ({generation} generation on {device}{refreshes})", file=sys.stderr)


if __name__ == '__main__':
    configure(globals())
    main()
