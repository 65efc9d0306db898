"""A training process for the tests, started with `accelerate launch tests/train_worker.py RECIPE_JSON [options]`.

Options:
    --dump-grads PATH      save the averaged gradients of step 1 (rank 0) as safetensors
    --dump-dtype PATH      record the output dtype of stage 1 during step 2 (rank 0) as text
    --nan-rank R --nan-step S   make rank R's first unit loss NaN from its S-th loss call on
    --resume               continue from the run folder's latest checkpoint
"""
import argparse
import json
import sys

import loco_timm.core.learner
from loco_timm.config import TrainConfig, from_dict
from loco_timm.training.train import NonFiniteLossError, train


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('recipe')
    parser.add_argument('--dump-grads')
    parser.add_argument('--dump-dtype')
    parser.add_argument('--nan-rank', type=int)
    parser.add_argument('--nan-step', type=int)
    parser.add_argument('--resume', action='store_true')
    args = parser.parse_args()
    cfg = from_dict(TrainConfig, json.loads(args.recipe))
    rank = int(__import__('os').environ.get('RANK', 0))
    if args.nan_rank is not None and rank == args.nan_rank:
        calls = [0]
        original = loco_timm.core.learner.NTXentLoss.forward

        def poisoned(self, z1, z2):
            calls[0] += 1
            loss = original(self, z1, z2)
            return loss * float('nan') if calls[0] >= args.nan_step else loss
        loco_timm.core.learner.NTXentLoss.forward = poisoned

    def after_backward(step, learner):
        if step == 0 and args.dump_grads and rank == 0:
            from safetensors.torch import save_file
            save_file({n: p.grad.detach().clone() for n, p in learner.named_parameters() if p.grad is not None},
                      args.dump_grads)
        if step == 0 and args.dump_dtype and rank == 0:
            def record(module, inputs, output):
                with open(args.dump_dtype, 'w') as f:
                    f.write(str(output.dtype))
            learner.stages[1].register_forward_hook(record)
    try:
        train(cfg, resume=args.resume, after_backward=after_backward)
    except NonFiniteLossError as err:
        print(f'NonFiniteLossError: {err}', file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
