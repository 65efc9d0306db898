"""Print the units and decoder sizes of LoCo / GIM / E2E learners as a Markdown table (used in docs/backbones.md).

    .venv/bin/python benchmarks/decoder_table.py resnet50 --input-size 3 224 224
"""
import argparse

import timm

from loco_timm import LocalLearner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', nargs='?', default='resnet50')
    parser.add_argument('--input-size', type=int, nargs=3, default=(3, 224, 224))
    args = parser.parse_args()
    print(f'{args.model} @ {"x".join(map(str, args.input_size))}\n')
    print('| mode | decoder | unit (stages) | decoder input | decoder params | decoder GMACs / image |')
    print('|---|---|---|---|---|---|')
    for mode, decoder in [('e2e', 'mlp'), ('gim', 'conv'), ('loco', 'conv'), ('loco', 'mlp')]:
        learner = LocalLearner(timm.create_model(args.model), mode=mode, decoder=decoder, input_size=args.input_size)
        for row in learner.summary():
            print(f'| {mode} | {decoder} | {row["unit"]} | {"x".join(map(str, row["input_shape"]))} '
                  f'| {row["params"] / 1e6:.2f} M | {row["flops"] / 2e9:.3f} |')


if __name__ == '__main__':
    main()
