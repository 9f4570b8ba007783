"""fairseq-s2s-attn: RNN encoder-decoder models (vanilla, Bahdanau, Luong) as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="fairseq-s2s-attn",
    version="0.1.0",
    description="Vanilla, Bahdanau and Luong RNN sequence-to-sequence models for fairseq",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_s2s_attn", "fairseq_s2s_attn.*"]),
    python_requires=">=3.9",
    # torch and fairseq are installed by scripts/setup_env.sh (see README): fairseq's own metadata
    # pulls torchaudio and a second torch, so neither is declared here.
    install_requires=["sentencepiece", "sacrebleu>=2.0"],
    license="MIT",
)
