# Build stage: compile the release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
# The manifest names the benches' files: cargo refuses a manifest whose
# targets are missing, even to build only the binary.
COPY benches ./benches
RUN cargo build --release --locked --bin reliability-lab

# Run stage: just the binary.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 lab
COPY --from=build /src/target/release/reliability-lab /usr/local/bin/reliability-lab
USER lab
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/reliability-lab"]
