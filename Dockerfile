# Reproduction of Koh & Liang (2017) on CPU. Data is mounted, never baked in:
#   docker build -t influence-repro .
#   docker run --rm -v /path/to/data:/data -v $PWD/output:/app/output influence-repro
# BASE_IMAGE: any image with Python 3.11 and pip (tests/docker/check_image.sh builds one from
# Debian's packages with debootstrap where Docker Hub is out of reach).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 INFLUENCE_DATA_DIR=/data MPLBACKEND=Agg
COPY requirements.txt setup.py README.md ./
RUN python -m pip install --no-cache-dir -r requirements.txt
COPY influence ./influence
COPY inception ./inception
COPY scripts ./scripts
COPY data/README.md ./data/README.md
RUN python -m pip install --no-cache-dir --no-deps -e .
VOLUME ["/data", "/app/output"]
CMD ["python", "scripts/reproduce_all.py", "--quick"]
