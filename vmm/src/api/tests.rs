//! Routing, statuses and JSON shapes against a fake VM.

use std::sync::Mutex;

use super::*;

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<&'static str>>,
    paused: Mutex<bool>,
}

impl VmApi for Fake {
    fn info(&self) -> VmInfo {
        VmInfo {
            state: if *self.paused.lock().unwrap() {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: 2,
            memory: 64 << 20,
            accelerator: "tcg".into(),
            devices: vec![DeviceInfo {
                kind: "serial".into(),
                socket: None,
                connection: "in-vmm".into(),
            }],
        }
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push("pause");
        let mut p = self.paused.lock().unwrap();
        if *p {
            return Err(ApiError::Conflict("already paused".into()));
        }
        *p = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push("resume");
        *self.paused.lock().unwrap() = false;
        Ok(())
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push("shutdown");
        Ok(())
    }
    fn reboot(&self) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push("reboot");
        Ok(())
    }
    fn power_button(&self) -> Result<(), ApiError> {
        Err(ApiError::Internal("no button".into()))
    }
    fn counters(&self) -> Counters {
        let mut c = Counters::new();
        c.entry("rtc".into()).or_default().insert("reads".into(), 7);
        c
    }
}

fn body(b: Option<Vec<u8>>) -> serde_json::Value {
    serde_json::from_slice(&b.expect("a body")).expect("JSON")
}

#[test]
fn info_and_counters_are_json() {
    let vm = Fake::default();
    let (st, b) = handle(&vm, "GET", "/api/v1/vm.info");
    assert_eq!(st, 200);
    let v = body(b);
    assert_eq!(v["state"], "Running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["memory"], 64 << 20);
    assert_eq!(v["accelerator"], "tcg");
    assert_eq!(v["devices"][0]["type"], "serial");
    assert_eq!(v["devices"][0]["socket"], serde_json::Value::Null);
    let (st, b) = handle(&vm, "GET", "/api/v1/vm.counters");
    assert_eq!(st, 200);
    assert_eq!(body(b)["rtc"]["reads"], 7);
    let (st, b) = handle(&vm, "GET", "/api/v1/vmm.ping");
    assert_eq!(st, 200);
    assert_eq!(body(b)["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn actions_reach_the_vm_and_errors_carry_a_status() {
    let vm = Fake::default();
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.pause"), (204, None));
    assert_eq!(
        body(handle(&vm, "GET", "/api/v1/vm.info").1)["state"],
        "Paused"
    );
    let (st, b) = handle(&vm, "PUT", "/api/v1/vm.pause");
    assert_eq!(st, 409);
    assert_eq!(body(b)["error"], "already paused");
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.resume"), (204, None));
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.reboot"), (204, None));
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.shutdown"), (204, None));
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.power-button").0, 500);
    assert_eq!(
        *vm.calls.lock().unwrap(),
        ["pause", "pause", "resume", "reboot", "shutdown"]
    );
}

#[test]
fn unknown_paths_and_wrong_methods_are_refused() {
    let vm = Fake::default();
    let (st, b) = handle(&vm, "GET", "/api/v1/vm.nope");
    assert_eq!(st, 404);
    assert!(body(b)["error"].as_str().unwrap().contains("vm.nope"));
    assert_eq!(handle(&vm, "GET", "/other").0, 404);
    let (st, b) = handle(&vm, "GET", "/api/v1/vm.pause");
    assert_eq!(st, 405);
    assert!(body(b)["error"].as_str().unwrap().contains("PUT"));
    assert_eq!(handle(&vm, "PUT", "/api/v1/vm.info").0, 405);
    assert!(vm.calls.lock().unwrap().is_empty());
}
