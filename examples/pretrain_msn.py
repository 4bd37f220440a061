#!/usr/bin/env python
"""
Pretrain a Vision Transformer with Masked Siamese Networks (MSN).

    python examples/pretrain_msn.py --output_dir outputs/msn-digits        # built-in digits, CPU, a few minutes
    accelerate launch examples/pretrain_msn.py --train_dir ./images --backbone vit_small_patch16_224 \\
        --per_device_train_batch_size 64 --num_train_epochs 300 --mixed_precision bf16 --output_dir outputs/msn-vits16
    accelerate launch --num_processes 8 --num_machines 2 --machine_rank 0 --main_process_ip HOST \\
        examples/pretrain_msn.py --dataset_name imagenet-1k ...

The training loop lives in `msn_hf.pretraining` (also installed as the `msn-pretrain` command); see
`python examples/pretrain_msn.py --help` for every argument.
"""

from msn_hf.cli import pretrain

if __name__ == "__main__":
    pretrain()
