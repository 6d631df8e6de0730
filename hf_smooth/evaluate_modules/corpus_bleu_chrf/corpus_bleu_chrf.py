"""`corpus_bleu_chrf`: corpus BLEU and chrF computed by sacrebleu with its defaults. An `evaluate` module shipped
inside hf_smooth, loadable offline (the hub's "sacrebleu" and "chrf" modules are downloaded scripts):
`hf_smooth.evaluate_modules.load("corpus_bleu_chrf")`."""

from hf_smooth.evaluate_modules import modules


class CorpusBleuChrf(modules.CorpusBleuChrfMetric):
    pass
