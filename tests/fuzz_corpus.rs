//! Replays the corpus of every fuzz target (tests/fuzz/corpus/TARGET)
//! through the function the target runs (`opsd::fuzz`), so what the fuzzer
//! once found stays fixed. The filter's corpus is replayed beside its parser
//! (src/registry/filter.rs).

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut replayed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{} fails", path.display());
        replayed += 1;
    }
    assert!(replayed >= 8, "the corpus at {} is missing", dir.display());
}

#[test]
fn grpc_message_corpus() {
    replay("grpc_message", opsd::fuzz::grpc_message);
}

#[test]
fn grpc_framing_corpus() {
    replay("grpc_framing", opsd::fuzz::grpc_framing);
}

#[test]
fn client_bytes_corpus() {
    replay("client_bytes", opsd::fuzz::client_bytes);
}

#[test]
fn rest_request_corpus() {
    replay("rest_request", opsd::fuzz::rest_request);
}
