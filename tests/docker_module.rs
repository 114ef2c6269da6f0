//! `docker` module against the real Docker engine: discovery, inspection, GC, restart, offline.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::container::{
    REGISTRY2_CONFIG, REGISTRY3_CONFIG, RegistryContainer, RunOptions, Storage,
    build_busybox_image, build_registry_image, docker, docker_available, docker_ok, exclusive_lock,
    http_status, shared_lock, unique_name, write_orphan_blob,
};
use docker_delete::docker::{ContainerService, DockerError, find_registry};
use docker_delete::service::Service;

macro_rules! require_docker {
    () => {
        if !docker_available() {
            return;
        }
    };
}

#[test]
fn discovers_the_one_running_registry() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = exclusive_lock();
    let reg = RegistryContainer::start(&image, Storage::BindMount);
    match find_registry(None) {
        Ok(found) => {
            assert_eq!(found.name, reg.name);
            assert_eq!(found.id, reg.id);
            assert_eq!(found.config_path, REGISTRY2_CONFIG);
            assert_eq!(found.root_in_container, "/var/lib/registry");
            assert_eq!(
                found.host_root,
                Some(reg.host_dir.as_ref().unwrap().path().to_path_buf())
            );
            assert_eq!(found.endpoint, reg.endpoint());
            assert!(
                found
                    .config_yaml
                    .unwrap()
                    .contains("blobdescriptor: inmemory")
            );
        }
        // A registry of someone else's on this machine: nothing to assert about "the one".
        Err(DockerError::Ambiguous { candidates })
            if candidates
                .iter()
                .any(|c| !c.name.starts_with("docker-delete-test")) =>
        {
            eprintln!("skipping: other registry containers run here: {candidates:?}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn two_registries_are_ambiguous() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = exclusive_lock();
    let a = RegistryContainer::start(&image, Storage::Inside);
    let b = RegistryContainer::start(&image, Storage::Inside);
    let err = find_registry(None).unwrap_err();
    let msg = err.to_string();
    match &err {
        DockerError::Ambiguous { candidates } => {
            for reg in [&a, &b] {
                assert!(
                    candidates
                        .iter()
                        .any(|c| c.name == reg.name && c.id == reg.id)
                );
            }
        }
        e => panic!("expected Ambiguous, got {e}"),
    }
    assert!(msg.contains(&a.name) && msg.contains(&b.name), "{msg}");
    assert!(msg.contains(image.tag()), "{msg}");
    assert!(msg.contains("--container NAME"), "{msg}");
}

#[test]
fn finds_by_name_and_by_id_prefix() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::BindMount);
    let by_name = find_registry(Some(&reg.name)).unwrap();
    assert_eq!(by_name.id, reg.id);
    assert_eq!(by_name.image, image.tag());
    assert_eq!(by_name.endpoint, reg.endpoint());
    let by_id = find_registry(Some(&reg.id[..10])).unwrap();
    assert_eq!(by_id.name, reg.name);
}

#[test]
fn unknown_container_is_refused() {
    require_docker!();
    let spec = unique_name("docker-delete-test-missing");
    match find_registry(Some(&spec)) {
        Err(e @ DockerError::NoSuchContainer { .. }) => assert!(e.to_string().contains(&spec)),
        other => panic!("expected NoSuchContainer, got {other:?}"),
    }
}

#[test]
fn stopped_container_is_not_running() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::Inside);
    docker_ok(&["stop", "-t", "2", &reg.name]);
    match find_registry(Some(&reg.name)) {
        Err(e @ DockerError::NotRunning { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("docker start {}", reg.name)), "{msg}");
        }
        other => panic!("expected NotRunning, got {other:?}"),
    }
}

#[test]
fn non_registry_container_is_refused() {
    require_docker!();
    let busybox = build_busybox_image();
    let registry = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let sleeper = RegistryContainer::sleeper(&busybox);
    // The registry image running something else is not a registry either.
    let impostor = RegistryContainer::run(
        &registry,
        RunOptions {
            publish: false,
            seed: false,
            wait: false,
            entrypoint: Some("sleep".into()),
            cmd: vec!["3600".into()],
            ..RunOptions::new(Storage::Inside)
        },
    );
    for (c, image) in [(&sleeper, busybox.tag()), (&impostor, registry.tag())] {
        match find_registry(Some(&c.name)) {
            Err(e @ DockerError::NotARegistry { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&c.name) && msg.contains(image), "{msg}");
                assert!(msg.contains("sleep 3600"), "{msg}");
            }
            other => panic!("expected NotARegistry, got {other:?}"),
        }
    }
}

#[test]
fn named_volume_host_root() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::NamedVolume);
    let found = find_registry(Some(&reg.name)).unwrap();
    let mountpoint = reg.host_storage().unwrap();
    assert_eq!(found.host_root, Some(mountpoint.clone()));
    assert!(mountpoint.join("docker/registry/v2/repositories").is_dir());
}

#[test]
fn data_inside_container_has_no_host_root_and_unpublished_has_no_endpoint() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::run(
        &image,
        RunOptions {
            publish: false,
            ..RunOptions::new(Storage::Inside)
        },
    );
    let found = find_registry(Some(&reg.name)).unwrap();
    assert_eq!(found.host_root, None);
    assert_eq!(found.endpoint, None);
}

#[test]
fn registry3_layout_env_root_and_parent_mount() {
    require_docker!();
    let image = build_registry_image(REGISTRY3_CONFIG);
    let _lock = shared_lock();
    // The command names no config file, so the module must find registry 3's default path;
    // the root comes from the environment and lives below the mount point.
    let reg = RegistryContainer::run(
        &image,
        RunOptions {
            mount_at: "/data".into(),
            env: vec![
                "CFG=/etc/distribution/config.yml".into(),
                "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=/data/store/registry".into(),
            ],
            entrypoint: Some("sh".into()),
            cmd: vec!["-c".into(), "exec registry serve \"$CFG\"".into()],
            storage_root: "/data/store/registry".into(),
            ..RunOptions::new(Storage::BindMount)
        },
    );
    let found = find_registry(Some(&reg.name)).unwrap();
    assert_eq!(found.config_path, REGISTRY3_CONFIG);
    assert!(found.config_yaml.is_some());
    assert_eq!(found.root_in_container, "/data/store/registry");
    let expected: PathBuf = reg.host_dir.as_ref().unwrap().path().join("store/registry");
    assert_eq!(found.host_root, Some(expected.clone()));
    assert!(expected.join("docker/registry/v2/repositories").is_dir());
    assert_eq!(found.endpoint, reg.endpoint());
}

#[test]
fn garbage_collect_in_running_container() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::BindMount);
    let found = find_registry(Some(&reg.name)).unwrap();
    let (hex, blob_dir) = write_orphan_blob(found.host_root.as_ref().unwrap(), b"running gc");
    let mut svc = ContainerService::new(found, false).unwrap();
    let t = Instant::now();
    let outcome = svc.garbage_collect().unwrap();
    eprintln!(
        "garbage-collect (exec) took {:?}:\n{}",
        t.elapsed(),
        outcome.output
    );
    assert!(outcome.success, "{}", outcome.output);
    assert!(
        outcome.output.contains("blobs marked"),
        "{}",
        outcome.output
    );
    assert!(outcome.output.contains(&hex), "{}", outcome.output);
    assert!(!blob_dir.exists());

    // A collector failure is reported, not turned into an error.
    std::fs::remove_dir_all(
        reg.host_dir
            .as_ref()
            .unwrap()
            .path()
            .join("docker/registry/v2/repositories"),
    )
    .unwrap();
    let outcome = svc.garbage_collect().unwrap();
    assert!(!outcome.success);
    assert!(
        outcome.output.contains("exited with status 1"),
        "{}",
        outcome.output
    );
}

#[test]
fn restart_waits_until_registry_answers() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::BindMount);
    let before = reg.inspect("{{.State.StartedAt}}");
    let mut svc = ContainerService::new(find_registry(Some(&reg.name)).unwrap(), false).unwrap();
    let t = Instant::now();
    svc.restart().unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    assert_eq!(
        http_status(&format!("{}/v2/", reg.endpoint().unwrap())),
        Some(200)
    );
    assert_ne!(reg.inspect("{{.State.StartedAt}}"), before);
    assert_eq!(svc.start_hint(), format!("docker start {}", reg.name));
}

#[test]
fn offline_gc_uses_a_one_shot_container() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::NamedVolume);
    let found = find_registry(Some(&reg.name)).unwrap();
    let (hex, blob_dir) = write_orphan_blob(found.host_root.as_ref().unwrap(), b"offline gc");
    let mut svc = ContainerService::new(found, false).unwrap();

    let t = Instant::now();
    svc.stop().unwrap();
    assert!(!svc.is_running().unwrap());
    let outcome = svc.garbage_collect().unwrap();
    eprintln!(
        "garbage-collect (one-shot) took {:?}:\n{}",
        t.elapsed(),
        outcome.output
    );
    assert!(outcome.success, "{}", outcome.output);
    assert!(outcome.output.contains(&hex), "{}", outcome.output);
    assert!(!blob_dir.exists());
    svc.start().unwrap();
    eprintln!("stop + gc + start took {:?}", t.elapsed());
    assert_eq!(
        http_status(&format!("{}/v2/", reg.endpoint().unwrap())),
        Some(200)
    );

    let left = docker_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=docker-delete.role=garbage-collect {}", reg.name),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(left, "", "helper containers left behind");
}

#[test]
fn offline_gc_failure_still_removes_the_helper() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    // Not seeded: the collector fails on a storage tree without `repositories`.
    let reg = RegistryContainer::run(
        &image,
        RunOptions {
            seed: false,
            ..RunOptions::new(Storage::BindMount)
        },
    );
    let mut svc = ContainerService::new(find_registry(Some(&reg.name)).unwrap(), false).unwrap();
    svc.stop().unwrap();
    let outcome = svc.garbage_collect().unwrap();
    assert!(!outcome.success, "{}", outcome.output);
    assert!(
        outcome.output.contains("Path not found"),
        "{}",
        outcome.output
    );
    let out = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=docker-delete.role=garbage-collect {}", reg.name),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}
