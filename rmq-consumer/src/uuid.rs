//! Task uuids. PLACEHOLDER: being written by the config helper.
