# Evaluate the tiny demo model (CPU): the embedded sample's two harness tasks and held-out perplexity.
#   python eval.py config/tiny_eval.py
checkpoint = 'checkpoints/demo/portable_final.pt'
tasks = 'demo_arith_mc,demo_arith_gen'
limit = 20                      # of the 40 questions each: exact generation is most of the demo's evaluation
include_path = 'data/demo/raw/tasks'
tokenizer = 'packaged'
output = 'results/demo/eval.json'
batch_tokens = 8192
data_dir = 'data/demo/tokenized'
perplexity_tokens = 1024
device = 'cpu'
