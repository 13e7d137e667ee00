//! qgjob-http: the axum server around the qgjob scheduler (user API, agent protocol, store).
