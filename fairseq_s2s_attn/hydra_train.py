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
"""


def cli_main() -> None:
    import fairseq_s2s_attn  # noqa: F401  (installs the plugin's changes to fairseq first)
    from fairseq_cli import hydra_train

    hydra_train.cli_main()


if __name__ == "__main__":
    cli_main()
