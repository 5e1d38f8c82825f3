# Reproduction of Koh & Liang (2017) on CPU. Data is mounted, never baked in:
#   docker build -t influence-repro .
#   docker run --rm -v /path/to/data:/data -v $PWD/output:/app/output influence-repro
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 INFLUENCE_DATA_DIR=/data MPLBACKEND=Agg
COPY requirements.txt setup.py README.md ./
RUN pip install --no-cache-dir -r requirements.txt
COPY influence ./influence
COPY inception ./inception
COPY scripts ./scripts
COPY data/README.md ./data/README.md
RUN pip install --no-cache-dir --no-deps -e .
VOLUME ["/data", "/app/output"]
CMD ["python", "scripts/reproduce_all.py", "--quick"]
