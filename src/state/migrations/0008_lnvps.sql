-- 0008: VMs this agent rented at LNVPS. `pending_payment` is the renewal being paid (stored before paying, so an
-- interrupted rent or renewal resumes with the same invoice); `released_at` marks a VM let go (`vps destroy`).
CREATE TABLE lnvps_vms (
  id INTEGER PRIMARY KEY,         -- the VM id at LNVPS
  state TEXT NOT NULL,
  ip TEXT,
  user TEXT NOT NULL,
  expires TEXT,                   -- RFC 3339, as the API reports it
  template TEXT NOT NULL,
  image TEXT NOT NULL,
  price_sats INTEGER,
  pending_payment TEXT,
  created_at TEXT NOT NULL,
  released_at TEXT
);
-- Every payment made for a VM (rent, renewal, upgrade): the receipt with this payment hash is the VM's.
CREATE TABLE lnvps_payments (
  payment_hash TEXT PRIMARY KEY,
  vm_id INTEGER NOT NULL,
  kind TEXT NOT NULL,             -- renew | upgrade
  amount_msat INTEGER NOT NULL,
  seconds INTEGER NOT NULL,       -- time added to the VM's expiry
  paid_at TEXT NOT NULL
);
CREATE INDEX lnvps_payments_vm ON lnvps_payments (vm_id);
