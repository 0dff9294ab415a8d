# inferoute: one image for the gateway, the picker, the controller and the simulator
# (`inferoute gateway|epp|controller|sim ...`). Build: docker build -t REGISTRY/inferoute:TAG .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && rm -rf /src
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin inferoute
USER 10001
WORKDIR /
ENTRYPOINT ["inferoute"]
