"""`mimkit tokenizer`: make the visual tokenizer file a CIM recipe reads."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  mimkit tokenizer fit -c tokenizers/kmeans_fmnist
  mimkit tokenizer fit -c tokenizers/vqvae_fmnist tokenizer.epochs=3 output=tokenizers/vq3.pt
  mimkit tokenizer fit -c tokenizers/dall_e tokenizer.encoder_file=~/dall_e/encoder.pkl \\
      tokenizer.decoder_file=~/dall_e/decoder.pkl
"""


def add(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("tokenizer", help="fit or import the visual tokenizer of a CIM recipe")
    sub = p.add_subparsers(title="tokenizer commands", metavar="ACTION", required=True)
    fit = sub.add_parser(
        "fit",
        help="fit the recipe's tokenizer kind (k-means, VQ-VAE, the DALL-E dVAE import or another registered one); "
        "report PSNR and codebook usage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make a tokenizer file from a tokenizer recipe, measure its reconstruction PSNR and codebook "
        "usage on held-out images, and draw originals beside reconstructions (<output>.png).",
        epilog=EPILOG,
    )
    fit.add_argument(
        "-c",
        "--config",
        required=True,
        help="tokenizer recipe: a shipped name (e.g. tokenizers/kmeans_fmnist) or a YAML path",
    )
    fit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. tokenizer.epochs=3")
    fit.set_defaults(run=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    from mimkit.procedures.tokenizer_fit import describe_metrics, fit_tokenizer, load_tokenizer_recipe
    from mimkit.viz.masks import panels_figure

    recipe = load_tokenizer_recipe(args.config, args.overrides)
    fitted = fit_tokenizer(recipe)
    images = fitted.images  # on the CPU, as the saved tokenizer
    reconstructions = fitted.tokenizer.decode(fitted.tokenizer.encode(images))
    figure = panels_figure([("original", images), (f"{fitted.tokenizer.kind} reconstruction", reconstructions)])
    picture = Path(fitted.path).with_suffix(".png")
    figure.savefig(picture, dpi=110)
    print(f"tokenizer {fitted.path}: {describe_metrics(fitted.metrics)}")
    print(f"saved {picture}")
    return 0
