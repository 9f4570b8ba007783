"""``python -m fairseq_s2s_attn.hydra_train``: fairseq-hydra-train with the plugin loaded first.

Which fairseq behaviour this fixes: fairseq-hydra-train imports ``common.user_dir`` only inside
its training function, after ``distributed_utils.call_main`` has chosen how to start the
processes, so the plugin's data-parallel launcher for CPU processes (``distributed.py``) comes too
late: on a machine without GPUs ``distributed_training.distributed_world_size=2`` stops at "world
size is 2 but have 0 available devices", and under torchrun every process trains alone on all the
data (``distributed.refuse_late_load`` now stops that). This command imports the plugin, then runs
fairseq's own ``fairseq_cli.hydra_train`` unchanged: the same arguments and configs (keep
``common.user_dir``; fairseq then finds the plugin already loaded). One-process runs work with
either command.

Errors under hydra: see ``errors.py`` (our errors print one line naming hydra's keys, with either
command).
"""

import functools
import re


@functools.lru_cache(maxsize=None)
def _option_groups():
    """{field name: [hydra groups that have it]} for fairseq's config groups, the model's
    (RNNS2SConfig) and the translation task's."""
    from dataclasses import fields, is_dataclass

    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.translation import TranslationConfig

    from .config import RNNS2SConfig

    groups = {f.name: f.type for f in fields(FairseqConfig) if is_dataclass(f.type)}
    groups.update(model=RNNS2SConfig, task=TranslationConfig)
    out = {}
    for group, cls in groups.items():
        for f in fields(cls):  # not fields that mirror another group's (II("common.fp16"))
            if not (isinstance(f.default, str) and f.default.startswith("${")):
                out.setdefault(f.name, []).append(group)
    return out


def hydra_keys(message: str) -> str:
    """The message with each command-line option (``--decoder-hidden-size``) written as hydra's
    key (``model.decoder_hidden_size``) where exactly one config group has that field; options
    of two groups (``--max-source-positions``: model and task) stay as they are."""
    groups = _option_groups()

    def key(m):
        name = m.group(1).replace("-", "_")
        if name in NAMED_GROUPS:
            return f"{NAMED_GROUPS[name]}._name"
        where = groups.get(name, [])
        return f"{where[0]}.{name}" if len(where) == 1 else m.group(0)

    # an option stands alone (after a space or an opening bracket), never inside a path
    return re.sub(r"(?:(?<=^)|(?<=[\s(\[\"'`]))--([a-z][a-z0-9-]*)(?=$|[\s,;:.)\]\"'`])", key, message)


# options that choose a registered component: hydra's key is the group's _name
NAMED_GROUPS = {"arch": "model", "task": "task", "criterion": "criterion", "optimizer": "optimizer",
                "lr_scheduler": "lr_scheduler", "bpe": "bpe", "tokenizer": "tokenizer"}


def cli_main() -> None:
    import fairseq_s2s_attn  # noqa: F401  (installs the plugin's changes to fairseq first)
    from fairseq_cli import hydra_train

    from .runtime import set_thread_defaults

    set_thread_defaults(batches=True)  # a training command (the plugin was loaded before it)
    hydra_train.cli_main()


if __name__ == "__main__":
    cli_main()
