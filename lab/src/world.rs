//! The whole lab world: chain, peers, model, lab.json, and the test harness.
