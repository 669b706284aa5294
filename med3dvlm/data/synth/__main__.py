"""``python -m med3dvlm.data.synth --out DIR --n N --size D H W --seed S``"""
import sys

from .writer import main

sys.exit(main())
