"""IJB-C / IJB-B evaluation (protocol: docs/evaluation.md): 1:1 verification and 1:N identification, self- and cross-test.

Command line: ``python tools/ijbc_eval/ijbc_eval.py -m=MODEL.pt -net=r50 [-N] [-m_old=OLD.pt -old_net=r18]``;
from Python: :func:`tools.ijbc_eval.ijbc_eval.evaluate`. Modules: ``meta`` (protocol files and
their cache), ``align`` (Umeyama alignment, image dataset), ``embed`` (model runners, extraction),
``metrics`` (template features, TAR@FAR, top-k, TPIR@FPIR), ``plots`` (ROC and DIR figures).
"""

CHUNK_IMAGES = 8192   # images per chunk of the embedding pass: the unit of resuming an interrupted embedding
INPUT_SCALE = 0.0078125   # model input (x − 127.5)·1/128, RGB, as the insightface IJB evaluation
