"""``python -m fairseq_s2s_attn`` prints the folder to give fairseq as ``--user-dir``.

    fairseq-train DATA --user-dir "$(python -m fairseq_s2s_attn)" --arch rnn_bahdanau ...
"""
import os

print(os.path.dirname(os.path.abspath(__file__)))
