# Figures of the tiny demo model (CPU, about ten seconds):  python analyze.py config/tiny_analyze.py
# and of its run over time and of what its SFT changed (make demo):
#   python analyze.py config/tiny_analyze.py --run=checkpoints/demo --output=figures/demo/run
#   python analyze.py config/tiny_analyze.py --shift=checkpoints/demo/portable_final.pt,checkpoints/demo/portable_sft_final.pt \
#       --output=figures/demo/shift
checkpoint = 'checkpoints/demo/portable_final.pt'
output = 'figures/demo'
data_dir = 'data/demo/tokenized'
seq_len = 128
max_tokens = 2048
audit_sequences = 4
batch_tokens = 8192
compare = ''
device = 'cpu'
