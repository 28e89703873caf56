"""The vim25 managed objects the simulator serves, shared by the SOAP and VI/JSON front ends.

A front end parses a request into ``(method, _this, params)`` with the parameter kinds of
:data:`PARAMS`, calls :meth:`VimService.invoke` or :meth:`VimService.get_property`, and
serialises the :class:`Data` tree it gets back (or the :class:`~.vim_faults.VimFault`).
Everything else (sessions, the VM state, guest credentials, transfer URLs, faults,
counters) is the same :class:`~.state.SimState` the ``/api`` endpoints use.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from . import guestfs
from .state import ROOT_VM_FOLDER, SimState, Vm
from .vapi import VapiError
from .vim_data import (
    API_VERSION,
    DEFAULT_PAGE,
    AnyValue,
    Data,
    DateTime,
    PropertySpec,
    Value,
    as_any,
    attributes,
    file_info,
    wire_safe,
)
from .vim_faults import (
    POWER_STATE,
    MoRef,
    VimFault,
    from_vapi,
    invalid_argument,
    method_not_found,
    not_authenticated,
    object_not_found,
)


@dataclass(frozen=True)
class Flavor:
    """The managed-object ids of a vCenter or of a standalone ESXi host."""

    esxi: bool
    service_instance: str = "ServiceInstance"

    def moid(self, role: str) -> str:
        table = ESXI_MOIDS if self.esxi else VCENTER_MOIDS
        return table[role]


VCENTER_MOIDS = {
    "rootFolder": "group-d1",
    "propertyCollector": "propertyCollector",
    "viewManager": "ViewManager",
    "sessionManager": "SessionManager",
    "searchIndex": "SearchIndex",
    "guestOperationsManager": "guestOperationsManager",
    "fileManager": "guestOperationsFileManager",
    "authManager": "guestOperationsAuthManager",
    "datacenter": "datacenter-1",
    "datacenterName": "Datacenter",
    "vmFolder": "group-v3",
}
# ESXi hostd's ids (govmomi's recorded ESXi ServiceContent); the two guest managers'
# ids follow the same pattern [estimate].
ESXI_MOIDS = {
    "rootFolder": "ha-folder-root",
    "propertyCollector": "ha-property-collector",
    "viewManager": "ViewManager",
    "sessionManager": "ha-sessionmgr",
    "searchIndex": "ha-searchindex",
    "guestOperationsManager": "ha-guest-operations-manager",
    "fileManager": "ha-guest-operations-file-manager",
    "authManager": "ha-guest-operations-auth-manager",
    "datacenter": "ha-datacenter",
    "datacenterName": "ha-datacenter",
    "vmFolder": "ha-folder-vm",
}

# REST guest_OS -> vim25 config.guestId (VirtualMachineGuestOsIdentifier)
GUEST_IDS = {
    "UBUNTU_64": "ubuntu64Guest",
    "RHEL_8_64": "rhel8_64Guest",
    "DEBIAN_12_64": "debian12_64Guest",
    "OTHER_LINUX_64": "otherLinux64Guest",
    "WINDOWS_9_SERVER_64": "windows9Server64Guest",
    "WINDOWS_2019SRV_64": "windows2019srv_64Guest",
}
MAX_VIEWS = 1000  # container views kept (oldest dropped): the simulator does not tie them
MAX_RESULTS = 1000  # objects per RetrievePropertiesEx page when maxObjects is unset
MAX_PENDING = 100  # unfinished RetrievePropertiesEx results kept for Continue


@dataclass(frozen=True)
class View:
    container: str  # folder id (ROOT_VM_FOLDER for the root folder / datacenter)
    types: tuple[str, ...]
    recursive: bool
    root: bool  # made on the root folder: non-recursive, it holds no VM or VM folder


def vim_name(name: str) -> str:
    """A name as vim25's ManagedEntity.name carries it: ``%``, ``/`` and ``\\`` escaped
    as %25, %2f and %5c (the real vCenter's escaping); control characters, which XML 1.0
    cannot carry, as %XX too [simulator choice]."""
    out = []
    for c in name:
        if c in "%/\\" or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"%{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


# Methods that need no session (System.Anonymous).
ANONYMOUS = frozenset({"RetrieveServiceContent", "Login", "CurrentTime"})


@dataclass
class CallContext:
    """One request's transport, session token in, and session changes out."""

    transport: str  # "soap" | "vi-json"
    token: str | None
    new_token: str | None = None
    logged_out: bool = False
    client: str = ""
    user_agent: str = ""


class VimService:
    """ServiceInstance, SessionManager, SearchIndex, ViewManager, PropertyCollector and the
    guest operations managers of one simulated vCenter or ESXi host."""

    def __init__(self, state: SimState, esxi: bool = False) -> None:
        self.state = state
        self.flavor = Flavor(esxi)
        self.mo = {role: self.flavor.moid(role) for role in VCENTER_MOIDS}
        self.views: collections.OrderedDict[str, View] = collections.OrderedDict()
        self.pending: collections.OrderedDict[str, tuple[int, list[Data]]] = (
            collections.OrderedDict()
        )
        self._ids = itertools.count(1)

    # ---- folders -----------------------------------------------------------------
    def folder_ref(self, folder_id: str) -> MoRef:
        if folder_id == ROOT_VM_FOLDER:
            return self.ref("vmFolder")
        return MoRef("Folder", folder_id)

    def folder_of(self, ref: MoRef) -> str | None:
        """The state's folder id of a Folder moref (None: the root folder)."""
        if ref == self.ref("rootFolder") or ref == self.ref("datacenter"):
            return None
        if ref == self.ref("vmFolder"):
            return ROOT_VM_FOLDER
        if ref.type == "Folder" and ref.value in self.state.folders:
            return ref.value
        raise object_not_found(ref)

    def under(self, folder_id: str | None, recursive: bool) -> tuple[list[str], list[Vm]]:
        """Folder ids and VMs in a folder (None: the root folder), or below it."""
        if folder_id is None:
            if not recursive:
                return [], []
            folder_id, inside = ROOT_VM_FOLDER, True
        else:
            inside = False
        state = self.state
        tree = state.folder_tree(folder_id) if recursive else {folder_id}
        folders = [
            f.folder
            for f in state.folders.values()
            if (f.parent in tree) or (inside and f.folder == folder_id)
        ]
        vms = [vm for vm in state.vms.values() if vm.folder in tree]
        return folders, vms

    # ---- inventory ---------------------------------------------------------------
    def ref(self, role: str) -> MoRef:
        types = {
            "rootFolder": "Folder",
            "propertyCollector": "PropertyCollector",
            "viewManager": "ViewManager",
            "sessionManager": "SessionManager",
            "searchIndex": "SearchIndex",
            "guestOperationsManager": "GuestOperationsManager",
            "fileManager": "GuestFileManager",
            "authManager": "GuestAuthManager",
            "datacenter": "Datacenter",
            "vmFolder": "Folder",
        }
        return MoRef(types[role], self.mo[role])

    def about(self) -> Data:
        if self.flavor.esxi:
            name, full, os_type, line, api_type = (
                "VMware ESXi",
                "VMware ESXi 8.0.3 build-24022510 (guestfs-sim)",
                "vmnix-x86",
                "embeddedEsx",
                "HostAgent",
            )
        else:
            name, full, os_type, line, api_type = (
                "VMware vCenter Server",
                "VMware vCenter Server 8.0.3 build-24022515 (guestfs-sim)",
                "linux-x64",
                "vpx",
                "VirtualCenter",
            )
        return Data(
            "AboutInfo",
            [
                ("name", name),
                ("fullName", full),
                ("vendor", "VMware, Inc."),
                ("version", "8.0.3"),
                ("patchLevel", ""),
                ("build", "24022515"),
                ("localeVersion", "INTL"),
                ("localeBuild", "000"),
                ("osType", os_type),
                ("productLineId", line),
                ("apiType", api_type),
                ("apiVersion", API_VERSION),
                ("instanceUuid", "5f0c6a7e-1d2b-4c3a-9e8f-6a5b4c3d2e1f"),
            ],
        )

    def service_content(self) -> Data:
        # XSD order of ServiceContent: rootFolder, propertyCollector, viewManager, about,
        # setting, userDirectory, sessionManager, ..., searchIndex, ..., guestOperationsManager
        return Data(
            "ServiceContent",
            [
                ("rootFolder", self.ref("rootFolder")),
                ("propertyCollector", self.ref("propertyCollector")),
                ("viewManager", self.ref("viewManager")),
                ("about", self.about()),
                ("sessionManager", self.ref("sessionManager")),
                ("searchIndex", self.ref("searchIndex")),
                ("guestOperationsManager", self.ref("guestOperationsManager")),
            ],
        )

    def vm_of(self, ref: Any) -> Vm:
        if not isinstance(ref, MoRef) or ref.type != "VirtualMachine":
            raise invalid_argument("vm")
        vm = self.state.vms.get(ref.value)
        if vm is None:
            raise object_not_found(ref)
        return vm

    # ---- sessions ----------------------------------------------------------------
    def check_session(self, ctx: CallContext) -> str:
        try:
            sess = self.state.session(ctx.token)
        except VapiError:
            raise not_authenticated() from None
        return sess.user

    def user_session(self, token: str, ctx: CallContext) -> Data:
        sess = self.state.sessions[token]
        offset = _wall_offset(self.state)
        login = DateTime(int(sess.created + offset))
        return Data(
            "UserSession",
            [
                ("key", _session_key(token)),
                ("userName", sess.user),
                ("fullName", sess.user.split("@", 1)[0]),
                ("loginTime", login),
                ("lastActiveTime", DateTime(int(sess.last_accessed + offset))),
                ("locale", "en"),
                ("messageLocale", "en"),
                ("extensionSession", False),
                ("ipAddress", ctx.client),
                ("userAgent", ctx.user_agent),
                ("callCount", 0),
            ],
        )

    # ---- dispatch ----------------------------------------------------------------
    async def invoke(
        self, ctx: CallContext, method: str, this: MoRef, params: dict[str, Any]
    ) -> Value:
        handler = self.lookup(this, method)
        if method not in ANONYMOUS:
            self.check_session(ctx)
        return await handler(ctx, this, params)

    def lookup(self, this: MoRef, method: str) -> Any:
        """The handler of ``method`` on ``this``; ManagedObjectNotFound / MethodNotFound."""
        mo = self.mo
        table: dict[tuple[str, str, str], Any] = {
            ("ServiceInstance", self.flavor.service_instance, "RetrieveServiceContent"): (
                self._retrieve_service_content
            ),
            ("ServiceInstance", self.flavor.service_instance, "CurrentTime"): self._current_time,
            ("SessionManager", mo["sessionManager"], "Login"): self._login,
            ("SessionManager", mo["sessionManager"], "Logout"): self._logout,
            ("SearchIndex", mo["searchIndex"], "FindByInventoryPath"): self._find_by_path,
            ("ViewManager", mo["viewManager"], "CreateContainerView"): self._create_view,
            ("PropertyCollector", mo["propertyCollector"], "RetrieveProperties"): self._retrieve,
            ("PropertyCollector", mo["propertyCollector"], "RetrievePropertiesEx"): (
                self._retrieve_ex
            ),
            ("PropertyCollector", mo["propertyCollector"], "ContinueRetrievePropertiesEx"): (
                self._continue_ex
            ),
            ("PropertyCollector", mo["propertyCollector"], "CancelRetrievePropertiesEx"): (
                self._cancel_ex
            ),
            ("GuestFileManager", mo["fileManager"], "ListFilesInGuest"): self._list_files,
            ("GuestFileManager", mo["fileManager"], "InitiateFileTransferFromGuest"): (
                self._initiate
            ),
            ("GuestAuthManager", mo["authManager"], "ValidateCredentialsInGuest"): self._validate,
        }
        handler = table.get((this.type, this.value, method))
        if handler is not None:
            return handler
        if method == "DestroyView" and this.type == "ContainerView":
            return self._destroy_view
        if method == "Fetch":
            return self._fetch
        known = {(t, v) for t, v, _m in table}
        if (this.type, this.value) in known or this.type == "ContainerView":
            raise method_not_found(this.type, method)
        raise object_not_found(this)

    async def _retrieve_service_content(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        return self.service_content()

    async def _current_time(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        return DateTime(int(time.time()))

    async def _login(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        try:
            token = self.state.login(p["userName"], p["password"])
        except VapiError:
            raise VimFault(
                "InvalidLogin", "Cannot complete login due to an incorrect user name or password."
            ) from None
        if ctx.token:
            self.state.logout(ctx.token)
        ctx.new_token = token
        return self.user_session(token, ctx)

    async def _logout(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        assert ctx.token is not None
        self.state.logout(ctx.token)
        ctx.logged_out = True
        return None

    async def _find_by_path(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        """``{datacenter}/vm/{folder/...}/{name}`` (names escaped as vim25 carries them),
        ``{datacenter}/vm`` and ``{datacenter}``."""
        parts = str(p["inventoryPath"]).split("/")
        if parts == [self.mo["datacenterName"]]:
            return self.ref("datacenter")
        if len(parts) < 2 or parts[0] != self.mo["datacenterName"] or parts[1] != "vm":
            return None
        folder = ROOT_VM_FOLDER
        for i, part in enumerate(parts[2:], start=2):
            last = i == len(parts) - 1
            if last:
                for vm in self.state.vms.values():
                    if vm.folder == folder and vim_name(vm.name) == part:
                        return MoRef("VirtualMachine", vm.vm)
            sub = [
                f.folder
                for f in self.state.folders.values()
                if f.parent == folder and vim_name(f.name) == part
            ]
            if not sub:
                return None
            folder = sub[0]
        return self.folder_ref(folder)

    async def _create_view(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        types = tuple(p.get("type") or ())
        container = p["container"]
        if any(t not in ("VirtualMachine", "Folder", "ManagedEntity") for t in types):
            raise invalid_argument("type", "The simulator's views hold VirtualMachine and Folder.")
        if not isinstance(container, MoRef):
            raise invalid_argument("container")
        folder = self.folder_of(container)
        view = View(folder or ROOT_VM_FOLDER, types, bool(p["recursive"]), folder is None)
        view_id = f"session[guestfs-sim]view-{next(self._ids)}"
        self.views[view_id] = view
        while len(self.views) > MAX_VIEWS:
            self.views.popitem(last=False)
        return MoRef("ContainerView", view_id)

    async def _destroy_view(self, ctx: CallContext, this: MoRef, p: Any) -> Value:
        self.view(this)
        del self.views[this.value]
        return None

    def view(self, ref: MoRef) -> View:
        view = self.views.get(ref.value)
        if view is None:
            raise object_not_found(ref)
        return view

    def view_contents(self, ref: MoRef) -> list[MoRef]:
        view = self.view(ref)
        folders, vms = self.under(None if view.root else view.container, view.recursive)
        out: list[MoRef] = []
        if not view.types or {"Folder", "ManagedEntity"} & set(view.types):
            out.extend(self.folder_ref(f) for f in folders)
        if not view.types or {"VirtualMachine", "ManagedEntity"} & set(view.types):
            out.extend(MoRef("VirtualMachine", vm.vm) for vm in vms)
        return out

    # ---- properties --------------------------------------------------------------
    def get_property(self, ref: MoRef, path: str) -> Value:
        """``path`` of ``ref`` (an AnyValue-free Python value); VimFault if unknown."""
        mo = self.mo
        if ref == self.ref("guestOperationsManager"):
            if path == "fileManager":
                return self.ref("fileManager")
            if path == "authManager":
                return self.ref("authManager")
        elif ref.type == "ServiceInstance" and ref.value == self.flavor.service_instance:
            if path == "content":
                return self.service_content()
        elif ref.type == "ContainerView":
            if path == "view":
                return self.view_contents(ref)
            self.view(ref)
        elif ref.type == "VirtualMachine":
            vm = self.vm_of(ref)
            if path == "parent":
                return self.folder_ref(vm.folder)
            value = _vm_property(vm, path)
            if value is not None:
                return value
        elif ref == self.ref("datacenter"):
            if path == "name":
                return mo["datacenterName"]
            if path == "vmFolder":
                return self.ref("vmFolder")
            if path == "parent":
                return self.ref("rootFolder")
        elif ref.type == "Folder":
            value = self._folder_property(ref, path)
            if value is not None:
                return value
        else:
            raise object_not_found(ref)
        raise VimFault(
            "InvalidProperty", f"Property {path} of {ref.type} is not served.", (("name", path),)
        )

    def _folder_property(self, ref: MoRef, path: str) -> Value:
        folder_id = self.folder_of(ref)
        if folder_id is None:  # the root folder
            return {
                "name": "Datacenters",
                "childEntity": [self.ref("datacenter")],
            }.get(path)
        f = self.state.folders[folder_id]
        if path == "name":
            return vim_name(f.name)
        if path == "parent":
            return self.ref("datacenter") if f.parent is None else self.folder_ref(f.parent)
        if path == "childEntity":
            folders, vms = self.under(folder_id, recursive=False)
            return [self.folder_ref(x) for x in folders] + [
                MoRef("VirtualMachine", vm.vm) for vm in vms
            ]
        return None

    async def _fetch(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        return self.get_property(this, str(p["prop"]))

    async def _retrieve(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        return self._collect(p["specSet"])

    async def _retrieve_ex(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        objects = self._collect(p["specSet"])
        options = p.get("options") or {}
        size = options.get("maxObjects") if isinstance(options, dict) else None
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise invalid_argument("options.maxObjects")
        return self._page(objects, size or MAX_RESULTS)

    def _page(self, objects: list[Data], size: int) -> Value:
        """A RetrieveResult of the first ``size`` objects, with a token for the rest."""
        if not objects:
            return None
        fields: list[tuple[str, Any]] = []
        if len(objects) > size:
            token = str(next(self._ids))
            self.pending[token] = (size, objects[size:])
            while len(self.pending) > MAX_PENDING:
                self.pending.popitem(last=False)
            fields.append(("token", token))
        fields.append(("objects", objects[:size]))
        return Data("RetrieveResult", fields)

    async def _continue_ex(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        held = self.pending.pop(str(p["token"]), None)
        if held is None:
            raise invalid_argument("token", "Unknown or finished RetrievePropertiesEx token.")
        size, rest = held
        return self._page(rest, size)

    async def _cancel_ex(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        if self.pending.pop(str(p["token"]), None) is None:
            raise invalid_argument("token", "Unknown or finished RetrievePropertiesEx token.")
        return None

    def _reach(self, obj: MoRef) -> list[MoRef]:
        """What a selectSet traversal from ``obj`` reaches (the simulator does not read
        the TraversalSpecs: a ContainerView reaches its view, a Folder or the Datacenter
        every folder and VM below it)."""
        if obj.type == "ContainerView":
            return self.view_contents(obj)
        if obj.type == "Folder" or obj == self.ref("datacenter"):
            folder = self.folder_of(obj)
            folders, vms = self.under(folder, recursive=True)
            return [self.folder_ref(f) for f in folders] + [
                MoRef("VirtualMachine", vm.vm) for vm in vms
            ]
        return []

    def _collect(self, specs: Sequence[PropertySpec]) -> list[Data]:
        """ObjectContent for each object of each spec (see :meth:`_reach`) that has
        properties asked for its type."""
        out: list[Data] = []
        for spec in specs:
            targets: list[MoRef] = []
            for obj, skip, traverse in spec.objects:
                if not skip:
                    targets.append(obj)
                if traverse:
                    targets.extend(self._reach(obj))
            for target in targets:
                paths = [ps for t, ps in spec.props if t == target.type]
                if not paths:
                    continue
                props = []
                for path in sorted({p for ps in paths for p in ps}):
                    value = self.get_property(target, path)
                    props.append(Data("DynamicProperty", [("name", path), ("val", as_any(value))]))
                out.append(Data("ObjectContent", [("obj", target), ("propSet", props)]))
        return out

    # ---- guest operations --------------------------------------------------------
    def _ready(self, p: dict[str, Any]) -> tuple[Vm, dict[str, Any]]:
        """Host-side checks of a guest call (no lane): VM, power, Tools, injected faults."""
        vm = self.vm_of(p["vm"])
        try:
            self.state.guest_ready(vm)
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        return vm, _rest_credentials(p["auth"])

    async def _validate(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        vm, creds = self._ready(p)
        try:
            async with self.state.guest_op(vm, "credentials.validate", ctx.transport):
                self.state.guest_login(creds, vm)
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        return None

    async def _list_files(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        index = p.get("index")
        size = p.get("maxResults")
        index = 0 if index is None else index
        size = DEFAULT_PAGE if size is None else size
        if index < 0:
            raise invalid_argument("index")
        if size < 0:
            raise invalid_argument("maxResults")
        size = min(size or DEFAULT_PAGE, self.state.options.max_page_size)
        vm, creds = self._ready(p)
        xml = ctx.transport == "soap"
        try:
            regex = guestfs.compile_pattern(p.get("matchPattern"))
            async with self.state.guest_op(vm, "files.list", ctx.transport) as op:
                account = self.state.guest_login(creds, vm)
                entries = await trio.to_thread.run_sync(
                    self.state.scan_dir, vm, account, p["filePath"]
                )
                scanned = len(entries)
                entries = [
                    e
                    for e in entries
                    if wire_safe(e, xml) and (regex is None or regex.search(e.name))
                ]
                page = entries[index : index + size]
                op.listed(scanned=scanned, returned=len(page))
        except VapiError as err:
            raise from_vapi(err, vm.vm) from err
        remaining = max(0, len(entries) - index - len(page))
        return Data(
            "GuestListFileInfo", [("files", [file_info(e) for e in page]), ("remaining", remaining)]
        )

    async def _initiate(self, ctx: CallContext, this: MoRef, p: dict[str, Any]) -> Value:
        vm, creds = self._ready(p)
        try:
            async with self.state.guest_op(vm, "transfer.create", ctx.transport):
                account = self.state.guest_login(creds, vm)
                url, e = self.state.create_transfer_info(vm, account, p["guestFilePath"])
        except VapiError as err:
            raise from_vapi(err, vm.vm, "guestFilePath") from err
        return Data(
            "FileTransferInformation",
            [("attributes", attributes(e)), ("size", e.size), ("url", url)],
        )


def _vm_property(vm: Vm, path: str) -> Value:
    running = vm.tools_running and vm.power_state == "POWERED_ON"
    power = AnyValue("VirtualMachinePowerState", POWER_STATE[vm.power_state])
    tools = "guestToolsRunning" if running else "guestToolsNotRunning"
    family = "windowsGuest" if vm.family == "WINDOWS" else "linuxGuest"
    guest_id = GUEST_IDS.get(vm.guest_os, "otherGuest64")
    simple: dict[str, Value] = {
        "name": vim_name(vm.name),
        "config.name": vim_name(vm.name),
        "config.instanceUuid": vm.instance_uuid,
        "config.uuid": vm.bios_uuid,
        "config.guestId": guest_id,
        "runtime.powerState": power,
        "runtime.connectionState": AnyValue("VirtualMachineConnectionState", "connected"),
        "guest.toolsRunningStatus": tools,
        "guest.guestOperationsReady": running,
        "guest.interactiveGuestOperationsReady": False,
        "guest.guestFamily": family,
    }
    if path in simple:
        return simple[path]
    if path == "runtime":
        return Data(
            "VirtualMachineRuntimeInfo",
            [("connectionState", "connected"), ("powerState", power.value)],
        )
    if path == "guest":
        return Data(
            "GuestInfo",
            [
                ("toolsRunningStatus", tools),
                ("toolsVersion", "12389"),
                ("guestFamily", family),
                ("guestOperationsReady", running),
                ("interactiveGuestOperationsReady", False),
            ],
        )
    return None


def _rest_credentials(auth: Any) -> dict[str, Any]:
    """A vim25 GuestAuthentication as the state's REST ``Credentials`` object."""
    if not isinstance(auth, dict):
        raise invalid_argument("auth")
    inter = auth.get("interactiveSession")
    kind = auth.get("_typeName")
    if kind == "NamePasswordAuthentication":
        return {
            "interactive_session": inter,
            "type": "USERNAME_PASSWORD",
            "user_name": auth.get("username"),
            "password": auth.get("password"),
        }
    if kind == "SAMLTokenAuthentication":
        return {
            "interactive_session": inter,
            "type": "SAML_BEARER_TOKEN",
            "user_name": auth.get("username"),
            "saml_token": auth.get("token"),
        }
    raise invalid_argument("auth", f"Unsupported guest authentication type {kind!r}.")


def _session_key(token: str) -> str:
    # UserSession.key is the session's id, not the secret cookie value
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _wall_offset(state: SimState) -> float:
    return time.time() - state.clock()
