"""The paper's pseudo-label pipeline as data: a definition (case sets chosen by their annotated classes,
stages with a model, a budget and pseudo-label steps) run stage by stage over the trainer
(:mod:`flare_rt.train`) and the inference runtime (:mod:`flare_rt.pipeline`), resumable, with provenance.

- :mod:`.definition` the JSON definition as frozen dataclasses (packaged: ``paper``, ``demo``)
- :mod:`.select`     case sets from the dataset index
- :mod:`.merge`      pseudo-labels merged into partial annotations (pure)
- :mod:`.pseudolabel` the runtime over many cases, in one process or over Ray
- :mod:`.runner`     stages in order: skip, resume, run; content hashes
- :mod:`.report`     Markdown + PNG report; :mod:`.command` ``flare-rt pipeline run|status``
"""
