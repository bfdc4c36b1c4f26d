//! Ferry's node agent data plane: everything an agent does on its node, without
//! Kubernetes. The agent binary wires it to the `VirtualMachineMigration` status: it
//! calls the phase function the operator asks for, with the cookies it reads from the
//! status, and writes the result back (see `DESIGN.md`, "The five phases").
//!
//! # Pieces
//! - [`node::Node`]: this node's name, stable host uuid (kept in the state dir), the
//!   address incoming migration streams use, and the state dir.
//! - [`supervisor::Supervisor`]: the node's QEMU processes, one state dir per guest
//!   (`<state>/vms/<key>/`, [`node::guest_key`]: `domain.xml`, `qmp.sock`, `qemu.pid`, `qemu.log`, serial logs,
//!   `migration.json`). [`start`](supervisor::Supervisor::start) runs QEMU in its own
//!   session, so agent restarts never kill guests;
//!   [`attach_all`](supervisor::Supervisor::attach_all) re-attaches on start-up;
//!   [`stop`](supervisor::Supervisor::stop) and
//!   [`destroy`](supervisor::Supervisor::destroy) stop guests cleanly or by force.
//! - [`qmp::Qmp`]: the QMP client (typed replies, events, timeouts, [`qmp::QmpError::Gone`]).
//! - [`domain::Domain`]: the supported libvirt domain XML subset
//!   ([`Domain::parse`](domain::Domain::parse), [`to_xml`](domain::Domain::to_xml));
//!   [`cmdline::qemu_args`] builds QEMU's argument vector from it.
//! - [`abi::check`]: ABI stability of a target definition against the running one.
//! - [`policy`]: the migration policy without QEMU: presets and explicit fields into a
//!   [`policy::Policy`], the capabilities and parameters per side, the convergence
//!   judgement, the post-copy switch and the timeouts.
//! - [`tls`]: TLS on the migration stream, QEMU-native: the node's
//!   [`tls::Credentials`] loaded as `tls-creds-x509` (peer verified) and, on the target,
//!   an `authz-simple` accepting only the source node's certificate
//!   ([`tls::apply`], [`tls::clear`]).
//! - [`stream`]: where the stream goes (direct TCP, or the UNIX sockets of tunnelled
//!   mode, whose bytes the agents carry), and which URIs may reach QEMU.
//! - [`cookie::Cookie`]: the `<ferry-migration>` cookie, at most [`cookie::MAX_COOKIE`]
//!   bytes, strictly decoded against what the receiver knows ([`cookie::Expect`]);
//!   [`cookie::parts_written_by`] says which phase writes which part.
//!
//! - [`statefile`]: the saved-state file (header, compressed stream, trailer with length,
//!   SHA-256 and an HMAC-SHA256 under the cluster's state key), [`statefile::verify`]
//!   refusing an unsigned, truncated, corrupted or foreign file, with bounded decoders.
//! - [`phases::save`]: the Perform of a migration to a file
//!   ([`save::save`](phases::save::save): the file created beneath the storage roots
//!   first, then pipe, QMP `getfd`, `migrate fd:`, compression on a blocking thread) and
//!   its Confirm ([`save::confirm_saved`](phases::save::confirm_saved)); [`restore`]:
//!   [`restore::SavedFile::open`] beneath the storage roots and [`restore::verify`]
//!   before any QEMU, then [`restore::restore_verified`] (`-incoming defer`,
//!   `migrate-incoming fd:`, `cont`).
//! - [`storage`]: host paths from a spec only beneath the storage roots an administrator
//!   named ([`storage::StorageRoots`]): [`storage::open_beneath`] (`openat2` without
//!   symbolic links or leaving the root, regular files only), [`storage::check_image`]
//!   (no qcow2 backing or data files, the declared format), [`storage::create_save`]
//!   (`O_EXCL`, then `renameat2(RENAME_NOREPLACE)`), [`storage::open_guest`] (a
//!   definition's disks for a start, handed to QEMU as descriptors). The roots are kept
//!   on the [`node::Node`] (`storage`); VM starts, saves and restores go through them.
//!
//! # The phases
//! Each takes the node's [`Supervisor`](supervisor::Supervisor) and one input struct
//! (`<Phase>Input`: the VM, the migration and the previous phase's output; a callback
//! or future of the caller's stays a parameter of its own), returns the next phase's
//! output, and is idempotent: a re-run for the same migration name returns the recorded
//! result (`migration.json` in the VM's state dir, [`phases::MigrationRecord`]). Errors
//! are [`error::PhaseError`] (phase, VM, migration, and an [`error::ErrorKind`] with a
//! stable [`label`](error::ErrorKind::label)). The phase functions are in [`phases`],
//! one module per phase.
//!
//! | phase | node | call | status fields to write |
//! | --- | --- | --- | --- |
//! | Begin | source | [`begin::begin`](phases::begin::begin)`(sup, BeginInput { vm, migration, target_xml })` | [`begin::BeginOutput`](phases::begin::BeginOutput): `domain_xml`, `cookies.begin` |
//! | Prepare | target | [`prepare::prepare`](phases::prepare::prepare)`(sup, PrepareInput { vm, migration, namespace, domain_xml, begin_cookie, listen, policy, tls })` | [`prepare::PrepareOutput`](phases::prepare::PrepareOutput): `migrationURI`, `cookies.prepare` |
//! | Perform | source | [`perform::perform`](phases::perform::perform)`(sup, PerformInput { vm, migration, uri, prepare_cookie, policy, tls, cancel }, on_progress)` | [`perform::PerformOutput`](phases::perform::PerformOutput): `cookies.perform`, `downtimeMs`, `totalTimeMs`, graphics, whether it went post-copy; `progress` from the callback |
//! | Finish | target | [`finish::finish`](phases::finish::finish)`(sup, FinishInput { vm, migration, perform_cookie, cancelled }, take_ownership)` | [`finish::FinishOutput`](phases::finish::FinishOutput): `cookies.finish` |
//! | Confirm | source | [`confirm::confirm`](phases::confirm::confirm)`(sup, ConfirmInput { vm, migration, finish_cookie, cancelled })` | [`confirm::Confirmed`](phases::confirm::Confirmed): `downtimeMs` again, the guest's ([`statistics::Statistics::guest_downtime_ms`]), when the target runs it; whether the guest runs here or is lost |
//!
//! `policy` is the effective [`policy::Policy`] from [`policy::resolve`] of the spec's
//! `policy` (preset plus explicit fields); Prepare and Perform must get the same one
//! (multifd and post-copy are set on both sides). `tls` is the node's
//! [`tls::Credentials`] for an encrypted stream (both sides or neither), `None` for
//! plain TCP.
//!
//! `take_ownership` is a future the Kubernetes layer supplies: it moves the VM's
//! `status.nodeName` (and so the disk lock) to the target, guarded by resourceVersion.
//! Finish awaits it only when the guest arrived whole, and resumes the vCPUs only after
//! it succeeded. Failure paths (each ends with one running guest, on the source):
//! Prepare fails → `confirm(cancelled=true)`; Perform fails or is cancelled (through the
//! [`CancellationToken`](tokio_util::sync::CancellationToken)) →
//! `finish(cancelled=true)` then `confirm(cancelled=true)`; Finish fails →
//! `confirm(cancelled=true)`. A post-copy stream cut during Perform is recovered, not
//! rolled back ([`postcopy`]: the target's [`postcopy::listen_again`] and
//! [`perform::perform_with_recovery`](phases::perform::perform_with_recovery) on the
//! source). Pure decisions (may a migration begin, did the guest arrive, should the
//! source resume, is a URI acceptable) are in [`phases`] itself.
//!
//! ```no_run
//! # async fn demo(src: &ferry_agent::supervisor::Supervisor, dst: &ferry_agent::supervisor::Supervisor)
//! # -> Result<(), ferry_agent::error::PhaseError> {
//! use ferry_agent::phases::{begin, confirm, finish, perform, prepare};
//! // `vm` is the guest's key on each node (its state dir): `node::guest_key` of the VM.
//! let (vm, migration) = ("guest-1", "default/move-guest-1");
//! let b = begin::begin(src, begin::BeginInput { vm, migration, target_xml: None }).await?;
//! let policy = ferry_agent::policy::Policy::default(); // the Balanced preset
//! let p = prepare::prepare(dst, prepare::PrepareInput {
//!     vm, migration, namespace: "default", domain_xml: &b.domain_xml, begin_cookie: &b.cookie,
//!     listen: ferry_agent::stream::Listen::Tcp(None), policy: &policy, tls: None,
//! }).await?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let r = perform::perform(src, perform::PerformInput {
//!     vm, migration, uri: &p.uri, prepare_cookie: &p.cookie,
//!     policy: &policy, tls: None, cancel: &cancel,
//! }, |_| {}).await?;
//! let f = finish::finish(dst, finish::FinishInput {
//!     vm, migration, perform_cookie: Some(&r.cookie), cancelled: false,
//! }, || async { Ok(()) }).await?;
//! confirm::confirm(src, confirm::ConfirmInput {
//!     vm, migration, finish_cookie: f.cookie.as_deref(), cancelled: false,
//! }).await?;
//! # Ok(()) }
//! ```

pub mod abi;
pub mod cgroup;
pub mod cmdline;
pub mod cookie;
pub mod domain;
pub mod error;
pub mod fault;
pub mod node;
pub mod phases;
pub mod policy;
pub mod postcopy;
pub mod qemu;
pub mod qmp;
pub mod restore;
pub mod statefile;
pub mod statistics;
pub mod storage;
pub mod stream;
pub mod supervisor;
pub mod testguest;
pub mod tls;
mod xml;

pub use xml::XmlError;
