"""tunelab: adapt language models and measure what each technique costs and gains.

import tunelab
lm = tunelab.load("smollm2-135m-instruct")
print(lm.generate("What is the capital of France?", max_new_tokens=20))
print(lm.perplexity("Some text to score."))
"""

from __future__ import annotations

from tunelab.loading import DTYPES, Pretrained, load

__version__ = "0.1.0"
__all__ = ["load", "Pretrained", "DTYPES"]
