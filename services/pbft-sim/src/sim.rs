//! The simulation loop: replicas, clients and a hostile network in one thread, in virtual
//! milliseconds. Every choice comes from the scenario's seeded generator, and events at the
//! same instant run in the order they were scheduled, so a seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use pbft_core::{
    ClientCore, ClientId, Ed25519Signer, Event, Input, KeyRing, MemStore, Message, OpResult,
    Operation, Output, PersistOp, Replica, ReplicaId, Reply, Request, Source, StateProvider,
    Storage, SyncResponse, Target,
};

use crate::byzantine::Adversary;
use crate::invariants::{Invariants, Violation};
use crate::memo::MemoVerifier;
use crate::rng::SimRng;
use crate::scenario::Scenario;

/// How a run ended well.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub seed: u64,
    /// Highest block height an honest replica committed.
    pub height: u64,
    pub completed_requests: usize,
    pub view_changes: u64,
    pub max_view: u64,
    pub messages: u64,
    pub dropped: u64,
    pub syncs: u64,
    pub rejected: u64,
    /// Virtual milliseconds simulated.
    pub virtual_ms: u64,
    /// Virtual milliseconds from healing until the last request completed.
    pub recovery_ms: u64,
}

/// How a run ended badly: the violated property, when, and the last things that happened.
#[derive(Debug)]
pub struct Failure {
    pub scenario: String,
    pub at_ms: u64,
    pub violation: Violation,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} at t={}ms", self.violation, self.at_ms)?;
        writeln!(f, "scenario: {}", self.scenario)?;
        writeln!(f, "last events:")?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Addr {
    Replica(usize),
    Client(usize),
}

#[derive(Clone, Debug)]
enum Payload {
    Msg(Message),
    Submit(Request),
    Reply(Reply),
}

struct InFlight {
    at: u64,
    order: u64,
    from: Addr,
    to: Addr,
    payload: Payload,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

struct SimReplica {
    secret: [u8; 32],
    core: Option<Replica>,
    store: MemStore,
    adversary: Option<Adversary>,
    /// The lowest executed block whose replies went out before it was synced, as the
    /// replica's persistence thread allows, while no later output has synced it. A crash
    /// loses the blocks from here up.
    unsynced_from: Option<u64>,
}

struct SimClient {
    core: ClientCore,
    rng: SimRng,
    /// Requests completed in all.
    done: usize,
    /// Requests issued after healing and completed: the liveness quota.
    done_after_heal: usize,
    /// Whether the outstanding request was issued after healing.
    pending_after_heal: bool,
    /// Think time: the next request is issued no earlier than this.
    next_at: u64,
}

/// One simulated cluster.
pub struct Sim {
    sc: Scenario,
    rng: SimRng,
    now: u64,
    order: u64,
    queue: BinaryHeap<Reverse<InFlight>>,
    replicas: Vec<SimReplica>,
    clients: Vec<SimClient>,
    verifier: Arc<MemoVerifier>,
    inv: Invariants,
    trace: VecDeque<String>,
    verbose: bool,
    out: Outcome,
}

const TRACE_LEN: usize = 400;

impl Sim {
    pub fn new(sc: Scenario, verbose: bool) -> Sim {
        let mut rng = SimRng::new(sc.seed);
        let n = sc.config.n;
        let secrets: Vec<[u8; 32]> = (0..n).map(|_| rng.bytes32()).collect();
        let client_secrets: Vec<[u8; 32]> = (0..sc.clients).map(|_| rng.bytes32()).collect();
        let publics: Vec<_> = secrets
            .iter()
            .map(|s| Ed25519Signer::from_secret(*s).public())
            .collect();
        let mut ring = KeyRing::new(&publics).expect("derived keys are valid");
        for (i, s) in client_secrets.iter().enumerate() {
            ring.add_client(ClientId(i as u64), Ed25519Signer::from_secret(*s).public())
                .expect("derived keys are valid");
        }
        let verifier = Arc::new(MemoVerifier::new(ring));
        let replicas = secrets
            .iter()
            .enumerate()
            .map(|(i, secret)| {
                let adversary =
                    sc.byzantine.iter().find(|(r, _)| *r == i).map(|(_, b)| {
                        Adversary::new(ReplicaId(i as u32), *b, n, *secret, rng.fork())
                    });
                let core = Replica::new(
                    sc.config.clone(),
                    ReplicaId(i as u32),
                    Box::new(Ed25519Signer::from_secret(*secret)),
                    verifier.clone(),
                )
                .expect("scenario configs are valid");
                SimReplica {
                    secret: *secret,
                    core: Some(core),
                    store: MemStore::new(),
                    adversary,
                    unsynced_from: None,
                }
            })
            .collect();
        let clients = client_secrets
            .iter()
            .enumerate()
            .map(|(i, s)| SimClient {
                core: ClientCore::new(
                    ClientId(i as u64),
                    Box::new(Ed25519Signer::from_secret(*s)),
                    n,
                    sc.client_retransmit,
                    1,
                ),
                rng: rng.fork(),
                done: 0,
                done_after_heal: 0,
                pending_after_heal: false,
                next_at: 0,
            })
            .collect();
        let out = Outcome {
            seed: sc.seed,
            ..Outcome::default()
        };
        Sim {
            rng: rng.fork(),
            sc,
            now: 0,
            order: 0,
            queue: BinaryHeap::new(),
            replicas,
            clients,
            verifier,
            inv: Invariants::default(),
            trace: VecDeque::new(),
            verbose,
            out,
        }
    }

    fn log(&mut self, line: String) {
        let line = format!("t={} {line}", self.now);
        if self.verbose {
            println!("{line}");
        }
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn fail(&self, violation: Violation) -> Failure {
        let mut trace: Vec<String> = self.trace.iter().cloned().collect();
        // Where each replica stands: what a stuck view change or sync looks like.
        for (i, r) in self.replicas.iter().enumerate() {
            trace.push(match r.core.as_ref() {
                Some(core) => {
                    let s = core.status();
                    format!(
                        "r{i}: view {}{} (primary r{}), executed {}, stable {}, sync {:?}, pending {}",
                        s.view,
                        if s.view_change_in_progress { " changing" } else { "" },
                        s.primary.0,
                        s.last_executed,
                        s.stable_checkpoint,
                        s.sync_target,
                        s.pending_requests
                    )
                }
                None => format!("r{i}: down"),
            });
        }
        for (i, c) in self.clients.iter().enumerate() {
            trace.push(format!(
                "c{i}: {} done, outstanding ts {:?}",
                c.done,
                c.core.pending().map(|r| r.timestamp)
            ));
        }
        Failure {
            scenario: self.sc.to_string(),
            at_ms: self.now,
            violation,
            trace,
        }
    }

    fn healed(&self) -> bool {
        self.now >= self.sc.heal_at
    }

    fn is_silent(&self, r: usize) -> bool {
        self.sc
            .silences
            .iter()
            .any(|(x, from, to)| *x == r && self.now >= *from && self.now < *to)
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.sc.network.partitions.iter().any(|(from, to, groups)| {
            self.now >= *from
                && self.now < *to
                && groups.iter().any(|g| g.contains(&a) != g.contains(&b))
        })
    }

    /// Puts a message on the wire, subject to the network's whims.
    fn send(&mut self, from: Addr, to: Addr, payload: Payload) {
        self.out.messages += 1;
        let net = &self.sc.network;
        let mut copies = 1;
        if !self.healed() {
            if let (Addr::Replica(a), Addr::Replica(b)) = (from, to)
                && self.partitioned(a, b)
            {
                self.out.dropped += 1;
                return;
            }
            if self.rng.chance(net.drop_percent) {
                self.out.dropped += 1;
                return;
            }
            if self.rng.chance(net.duplicate_percent) {
                copies = 2;
            }
        }
        let (lo, hi) = (net.min_delay, net.max_delay);
        for _ in 1..copies {
            self.enqueue(from, to, payload.clone(), lo, hi);
        }
        self.enqueue(from, to, payload, lo, hi);
    }

    fn enqueue(&mut self, from: Addr, to: Addr, payload: Payload, lo: u64, hi: u64) {
        let delay = self.rng.range(lo, hi);
        self.order += 1;
        self.queue.push(Reverse(InFlight {
            at: self.now + delay,
            order: self.order,
            from,
            to,
            payload,
        }));
    }

    /// Runs the scenario to the end: success once every client finished after healing.
    pub fn run(mut self) -> Result<Outcome, Box<Failure>> {
        let deadline = self.sc.heal_at + self.sc.liveness_bound;
        self.log(format!("start {}", self.sc));
        while self.now <= deadline {
            self.step().map_err(|v| Box::new(self.fail(v)))?;
            if self.healed() && self.all_done() {
                self.out.recovery_ms = self.now.saturating_sub(self.sc.heal_at);
                self.out.virtual_ms = self.now;
                self.out.height = self.inv.max_height();
                self.out.completed_requests = self.clients.iter().map(|c| c.done).sum();
                self.out.rejected = self
                    .replicas
                    .iter()
                    .filter_map(|r| r.core.as_ref())
                    .map(|c| c.rejected().total())
                    .sum();
                return Ok(self.out);
            }
            self.now += 1;
        }
        let pending = self
            .clients
            .iter()
            .map(|c| {
                self.sc
                    .requests_per_client
                    .saturating_sub(c.done_after_heal)
            })
            .sum();
        Err(Box::new(self.fail(Violation::Liveness {
            pending,
            waited: self.sc.liveness_bound,
        })))
    }

    /// Advances virtual time by `ms` milliseconds, checking safety at every step (used by
    /// the demo, which has no end).
    pub fn advance(&mut self, ms: u64) -> Result<(), Box<Failure>> {
        for _ in 0..ms {
            self.step().map_err(|v| Box::new(self.fail(v)))?;
            self.now += 1;
        }
        Ok(())
    }

    /// Current virtual time in ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Each replica's status, `None` while it is crashed.
    pub fn statuses(&self) -> Vec<Option<pbft_core::Status>> {
        self.replicas
            .iter()
            .map(|r| r.core.as_ref().map(|c| c.status()))
            .collect()
    }

    /// Client requests completed so far.
    pub fn completed_requests(&self) -> usize {
        self.clients.iter().map(|c| c.done).sum()
    }

    fn all_done(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.done_after_heal >= self.sc.requests_per_client)
    }

    /// One virtual millisecond.
    fn step(&mut self) -> Result<(), Violation> {
        self.apply_crashes()?;
        // Protocol messages due at a replica this millisecond reach it together, as the
        // node loop hands over what queued up in one turn: their signatures are checked in
        // one batch (`Input::ReceiveMany`), which forged signatures must not get through.
        let mut held: Vec<Vec<(Source, Message)>> = vec![Vec::new(); self.replicas.len()];
        while self.queue.peek().is_some_and(|m| m.0.at <= self.now) {
            let Reverse(m) = self.queue.pop().expect("peeked");
            self.deliver(m, &mut held)?;
        }
        for (r, mut msgs) in held.into_iter().enumerate() {
            let input = match msgs.len() {
                0 => continue,
                1 => {
                    let (from, msg) = msgs.remove(0);
                    Input::Receive { from, msg }
                }
                _ => Input::ReceiveMany(msgs),
            };
            if let Some(core) = self.replicas[r].core.as_mut() {
                core.handle(input);
            }
            self.flush(r)?;
        }
        for r in 0..self.replicas.len() {
            if self.is_silent(r) {
                continue;
            }
            if let Some(core) = self.replicas[r].core.as_mut() {
                core.handle(Input::Tick);
                self.flush(r)?;
            }
        }
        for c in 0..self.clients.len() {
            self.client_step(c);
        }
        Ok(())
    }

    fn apply_crashes(&mut self) -> Result<(), Violation> {
        for spec in self.sc.crashes.clone() {
            let r = &mut self.replicas[spec.replica];
            if spec.at == self.now && r.core.is_some() {
                r.core = None;
                if spec.wipe {
                    r.store.wipe();
                }
                let lost = r.unsynced_from.take();
                if let Some(height) = lost {
                    r.store.forget_blocks_from(height);
                }
                self.log(format!(
                    "crash r{}{}",
                    spec.replica,
                    if spec.wipe { " (disk wiped)" } else { "" }
                ));
                if let Some(height) = lost {
                    self.log(format!(
                        "r{} lost its unsynced blocks from {height}",
                        spec.replica
                    ));
                }
            }
            let r = &mut self.replicas[spec.replica];
            if spec.restart == self.now && r.core.is_none() {
                let recovered = r.store.recover().map_err(|e| Violation::Recovery {
                    replica: spec.replica,
                    error: e.to_string(),
                })?;
                let core = Replica::recover(
                    self.sc.config.clone(),
                    ReplicaId(spec.replica as u32),
                    Box::new(Ed25519Signer::from_secret(r.secret)),
                    self.verifier.clone(),
                    recovered,
                )
                .map_err(|e| Violation::Recovery {
                    replica: spec.replica,
                    error: e.to_string(),
                })?;
                let st = core.status();
                r.core = Some(core);
                self.log(format!(
                    "restart r{} at height {} view {}",
                    spec.replica, st.last_executed, st.view
                ));
            }
        }
        Ok(())
    }

    /// Delivers `m`; a protocol message for a replica goes to `held` instead, to reach it
    /// with the others due this millisecond.
    fn deliver(
        &mut self,
        m: InFlight,
        held: &mut [Vec<(Source, Message)>],
    ) -> Result<(), Violation> {
        match m.to {
            Addr::Client(c) => {
                if let (Payload::Reply(reply), Addr::Replica(from)) = (m.payload, m.from) {
                    self.on_client_reply(c, from, reply)?;
                }
                Ok(())
            }
            Addr::Replica(r) => {
                if self.is_silent(r) || self.replicas[r].core.is_none() {
                    return Ok(());
                }
                let input = match m.payload {
                    Payload::Msg(Message::SyncRequest(req)) => {
                        if let Addr::Replica(asker) = m.from {
                            self.serve_sync(r, asker, req.from_height, req.max_blocks);
                        }
                        return Ok(());
                    }
                    Payload::Msg(msg) => {
                        let from = match m.from {
                            Addr::Replica(x) => Source::Replica(ReplicaId(x as u32)),
                            Addr::Client(_) => Source::Client,
                        };
                        if let Some(adv) = self.replicas[r].adversary.as_mut() {
                            adv.overhear(&msg);
                            if let Message::Request(req) = &msg
                                && !adv.accepts_request(req)
                            {
                                return Ok(());
                            }
                        }
                        held[r].push((from, msg));
                        return Ok(());
                    }
                    Payload::Submit(req) => {
                        if let Some(adv) = self.replicas[r].adversary.as_ref()
                            && !adv.accepts_request(&req)
                        {
                            return Ok(());
                        }
                        Input::Request(req)
                    }
                    Payload::Reply(_) => return Ok(()),
                };
                if let Some(core) = self.replicas[r].core.as_mut() {
                    core.handle(input);
                }
                self.flush(r)
            }
        }
    }

    /// The adapter's StateProvider role: answer a sync request from the replica's store.
    fn serve_sync(&mut self, server: usize, asker: usize, from: u64, max: u32) {
        let store = &self.replicas[server].store;
        let blocks = store.blocks_from(from, max as usize).unwrap_or_default();
        let checkpoint = store
            .checkpoints()
            .ok()
            .and_then(|c| c.into_iter().next_back());
        let mut resp = SyncResponse { blocks, checkpoint };
        if let Some(adv) = self.replicas[server].adversary.as_mut() {
            resp = adv.corrupt_sync(resp);
        }
        self.out.syncs += 1;
        self.send(
            Addr::Replica(server),
            Addr::Replica(asker),
            Payload::Msg(Message::SyncResponse(resp)),
        );
    }

    /// Carries out a replica's output: persist first, check invariants, then send.
    fn flush(&mut self, r: usize) -> Result<(), Violation> {
        let Some(core) = self.replicas[r].core.as_mut() else {
            return Ok(());
        };
        let output: Output = core.take_output();
        if output.is_empty() {
            return Ok(());
        }
        let view = core.status().view;
        let n = self.sc.config.n;
        let honest = self.replicas[r].adversary.is_none();
        self.replicas[r]
            .store
            .persist(&output.persist)
            .map_err(|e| Violation::Recovery {
                replica: r,
                error: e.to_string(),
            })?;
        // What a crash now would lose: the persistence thread answers an output that only
        // executes blocks before syncing them, and syncs them with the next other output.
        let unsynced = &mut self.replicas[r].unsynced_from;
        if output.replies_may_precede_persist() {
            let lowest = output.persist.iter().find_map(|op| match op {
                PersistOp::Block(b) => Some(b.height),
                _ => None,
            });
            *unsynced = unsynced.or(lowest);
        } else {
            *unsynced = None;
        }
        for op in &output.persist {
            if let PersistOp::Block(b) = op
                && honest
            {
                self.inv.on_block(r, b)?;
            }
        }
        for e in &output.events {
            match e {
                Event::ViewChangeStarted { view } => {
                    self.out.view_changes += 1;
                    self.log(format!("r{r} starts view change to {view}"));
                }
                Event::ViewEntered { view } => {
                    self.out.max_view = self.out.max_view.max(*view);
                    self.log(format!("r{r} enters view {view}"));
                }
                Event::SyncStarted { from, target } => {
                    self.log(format!("r{r} syncs {from}..={target}"));
                }
                Event::CheckpointStable { seq } => {
                    self.log(format!("r{r} checkpoint {seq} stable"));
                }
                Event::Executed {
                    height,
                    requests,
                    synced,
                    ..
                } if self.verbose => {
                    self.log(format!(
                        "r{r} executed {height} ({requests} requests{})",
                        if *synced { ", synced" } else { "" }
                    ));
                }
                Event::Rejected { reason } if self.verbose => {
                    self.log(format!("r{r} rejected: {reason}"));
                }
                _ => {}
            }
        }
        let mut outgoing = Vec::new();
        for env in output.messages {
            if honest
                && let Message::Checkpoint(c) = &env.msg
                && c.body.replica.0 as usize == r
            {
                self.inv.on_checkpoint(r, c.body.seq, c.body.state_digest)?;
            }
            match env.to {
                Target::All => {
                    for to in (0..n).filter(|x| *x != r) {
                        outgoing.push((ReplicaId(to as u32), env.msg.clone()));
                    }
                }
                Target::Replica(to) => outgoing.push((to, env.msg)),
            }
        }
        if let Some(adv) = self.replicas[r].adversary.as_mut() {
            outgoing = adv.corrupt(view, outgoing);
        }
        for (to, msg) in outgoing {
            self.send(
                Addr::Replica(r),
                Addr::Replica(to.0 as usize),
                Payload::Msg(msg),
            );
        }
        for mut reply in output.replies {
            if honest {
                self.inv.on_honest_reply(&reply)?;
            } else if self.rng.chance(50) {
                // Byzantine replicas also lie to clients.
                reply.result = OpResult::Value(Some(b"forged".to_vec()));
            }
            let c = reply.client.0 as usize;
            if c < self.clients.len() {
                self.send(Addr::Replica(r), Addr::Client(c), Payload::Reply(reply));
            }
        }
        Ok(())
    }

    fn on_client_reply(&mut self, c: usize, from: usize, reply: Reply) -> Result<(), Violation> {
        let client = &mut self.clients[c];
        if let Some(done) = client.core.on_reply(ReplicaId(from as u32), reply) {
            client.done += 1;
            if client.pending_after_heal {
                client.done_after_heal += 1;
            }
            client.next_at = self.now + client.rng.range(0, self.sc.think_time);
            let id = client.core.id();
            self.inv.on_accept(id, &done)?;
            self.log(format!(
                "c{c} accepted ts {} = {:?} from {:?}",
                done.timestamp, done.result, done.voters
            ));
        }
        Ok(())
    }

    fn client_step(&mut self, c: usize) {
        let n = self.sc.config.n;
        let quota = self.sc.requests_per_client;
        let keys = self.sc.keys;
        let healed = self.healed();
        let now = self.now;
        let client = &mut self.clients[c];
        let mut sends = Vec::new();
        // Load runs through the whole chaos phase; after healing each client must still get
        // `quota` fresh requests through.
        let wants_more = !healed || client.done_after_heal < quota;
        if client.core.pending().is_none() && wants_more && now >= client.next_at {
            let op = random_op(&mut client.rng, keys);
            if let Ok(s) = client.core.submit(op) {
                client.pending_after_heal = healed;
                sends.push(s);
            }
        }
        if let Some(s) = client.core.tick() {
            sends.push(s);
        }
        for s in sends {
            self.inv.on_submit(&s.request);
            match s.to {
                Target::Replica(r) => self.send(
                    Addr::Client(c),
                    Addr::Replica(r.0 as usize),
                    Payload::Submit(s.request),
                ),
                Target::All => {
                    for r in 0..n {
                        self.send(
                            Addr::Client(c),
                            Addr::Replica(r),
                            Payload::Submit(s.request.clone()),
                        );
                    }
                }
            }
        }
    }
}

fn random_op(rng: &mut SimRng, keys: u64) -> Operation {
    let key = format!("k{}", rng.range(0, keys - 1)).into_bytes();
    let value = format!("v{}", rng.range(0, 9)).into_bytes();
    match rng.range(0, 9) {
        0..=3 => Operation::Put { key, value },
        4..=5 => Operation::Get { key },
        6 => Operation::Delete { key },
        _ => Operation::Cas {
            key,
            expected: rng
                .chance(50)
                .then(|| format!("v{}", rng.range(0, 9)).into_bytes()),
            new: value,
        },
    }
}
