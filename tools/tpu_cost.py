"""FLOPs and bytes accessed per chip of the 4B SFT step compiled for a TPU.

    .venv/bin/python tools/tpu_cost.py --layers 2 4 --seq 512

Compiles `sft.make_step` of configs/qwen3-4b-sft.yaml for v5p:2x2x2 (fsdp=8, one row per chip) with
libtpu's compiler on this machine (`make fit-tools`), the model cut to each number of blocks, and
prints `compiled.cost_analysis()`. At 512 tokens the step has no loop (dense attention, one vocab
chunk), so the counts are whole; the TPU compiler undercounts loops. Run it from a checkout of
another commit (PYTHONPATH) to compare code.
"""

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--target", default="v5p:2x2x2")
    args = p.parse_args()

    from qedjax import fit
    from qedjax.config import load_config

    fit._load_libtpu()
    cfg = load_config("configs/qwen3-4b-sft.yaml", [f"sft.data.seq_len={args.seq}", "sft.micro_batches=1",
                                                    "sft.global_batch=8"])
    mesh = fit.target_mesh(args.target, "fsdp=8")
    for layers in args.layers:
        [prog] = fit.programs(cfg, mesh, ("sft",), layers=layers)
        compiled = prog.fn.lower(*prog.args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(f"{prog.name}, {layers} blocks: FLOPs {cost.get('flops', float('nan')):.4g}, bytes accessed "
              f"{cost.get('bytes accessed', float('nan')):.4g}, peak "
              f"{compiled.memory_analysis().peak_memory_in_bytes / 2**30:.2f} GiB per chip")


if __name__ == "__main__":
    main()
